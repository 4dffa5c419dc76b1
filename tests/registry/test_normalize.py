import pytest
from whisper_registry.normalize import (
    normalize_basic,
    normalize_chinese,
    normalize_english,
    normalizer_for,
    number_rule,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("One two three four five six seven eight nine ten.", "1 2 3 4 5 6 7 8 9 10"),
        (" 1, 2, 3, 4, 5, 6, 7, 8, 9, 10.", "1 2 3 4 5 6 7 8 9 10"),
        ("Hello World.", "hello world"),
        ("twenty one dogs and one hundred and five cats", "21 dogs and 105 cats"),
        ("two thousand twenty four", "2024"),
        ("nineteen ninety nine", "1999"),
        ("in nineteen eighty four he was twenty one", "in 1984 he was 21"),
        ("It costs $1,000.50 (approx) - 3.5% more!", "it costs 1000.50 dollars 3.5 percent more"),
        ("[MUSIC] The dog's bone, isn't it?", "the dogs bone isnt it"),
        ("I have two and three", "i have 2 and 3"),
    ],
)
def test_english(text, expected):
    assert normalize_english(text) == expected


def test_chinese_simplifies_and_drops_punctuation_and_spaces():
    assert normalize_chinese("天地玄黃 宇宙洪荒。") == "天地玄黄宇宙洪荒"
    assert normalize_chinese("你好，世界！") == "你好世界"


def test_chinese_reads_digits_as_chinese_digits():
    # Whisper writes the counting clip 一二三... as Arabic digits.
    assert normalize_chinese("123") == normalize_chinese("一二三")


# (language, reference as a speaker's transcript writes it, Whisper's way, a different number)
NUMBER_CASES = [
    ("es", "Uno, dos, tres, cuatro, cinco, seis, siete, ocho, nueve, diez.", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10.",
     "1, 2, 3, 4, 5, 6, 7, 8, 9, 11."),
    ("es", "Nació en mil novecientos noventa y nueve.", "Nació en 1999.", "Nació en 1989."),
    ("es", "Había veintidós perros y mil personas.", "Había 22 perros y 1.000 personas.", "Había 22 perros y 100 personas."),
    ("fr", "Un, deux, trois, quatre, cinq.", "1, 2, 3, 4, 5.", "1, 2, 3, 4, 6."),
    ("fr", "En deux mille quinze, il avait quatre-vingt-dix-sept ans.", "En 2015, il avait 97 ans.",
     "En 2015, il avait 87 ans."),
    ("de", "Eins, zwei, drei, vier, fünf.", "1, 2, 3, 4, 5.", "1, 2, 3, 4, 4."),
    ("de", "Im Jahr zweitausendfünfzehn kamen einundzwanzig Gäste.", "Im Jahr 2015 kamen 21 Gäste.",
     "Im Jahr 2015 kamen 12 Gäste."),
    ("zh", "二零一五年", "2015年", "2016年"),  # AISHELL reads years digit by digit
    ("zh", "十五", "15", "50"),
    ("zh", "他在二零一五年买了十五本書。", "他在2015年买了15本书", "他在2015年买了16本书"),
    ("zh", "一二三四五", "1、2、3、4、5。", "1、2、3、4、6。"),
    ("zh", "一二三四五六七八九十。", "1、2、3、4、5、6、7、8、9、10", "1、2、3、4、5、6、7、8、9、0"),  # not one number
]


@pytest.mark.parametrize(("language", "words", "digits", "other"), NUMBER_CASES)
def test_numbers_in_words_and_digits_are_equal_and_other_numbers_are_not(language, words, digits, other):
    normalize = normalizer_for(language)
    assert normalize(words) == normalize(digits)
    assert normalize(words) != normalize(other)


def test_mixed_words_and_digits_keep_the_words_around_them():
    normalize = normalizer_for("es")
    assert normalize("Tengo veintidós años y 3 gatos.") == normalize("tengo 22 años y tres gatos") == "tengo 22 años y 3 gatos"
    assert normalize("Tengo veintidós años.") != normalize("Tenía 22 años.")  # a wrong word stays wrong
    assert normalize_chinese("我有两个苹果") != normalize_chinese("我有3个苹果")


def test_each_language_names_its_number_rule():
    assert [number_rule(lang) for lang in ("en", "es", "fr", "de", "it", "pt", "nl", "da", "zh", "yue")] == [
        "whisper-english", *["text2num"] * 7, "cn2an", "cn2an"]
    assert number_rule("ja") is None and number_rule("pl") is None and number_rule(None) is None


def test_basic_keeps_letters_of_other_scripts():
    assert normalize_basic("Ça va? Très bien!") == "ça va très bien"


def test_normalizer_for_language():
    assert normalizer_for("en") is normalize_english
    assert normalizer_for("zh") is normalize_chinese
    assert normalizer_for(None) is normalize_basic
    assert normalizer_for("ja") is not normalize_basic and normalizer_for("pl") is normalize_basic
    assert normalizer_for("fr")("Ça va? Très bien!") == "ça va très bien"
