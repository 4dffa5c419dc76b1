import pytest

from whisper_registry.normalize import normalize_basic, normalize_chinese, normalize_english, normalizer_for


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


def test_basic_keeps_letters_of_other_scripts():
    assert normalize_basic("Ça va? Très bien!") == "ça va très bien"


def test_normalizer_for_language():
    assert normalizer_for("en") is normalize_english
    assert normalizer_for("zh") is normalize_chinese
    assert normalizer_for(None) is normalize_basic
    assert normalizer_for("fr") is normalize_basic
