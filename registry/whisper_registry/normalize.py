"""Text normalisation before scoring, in the spirit of Whisper's normalisers.

Both sides of a pair go through the same normaliser, so a number written in words on one side
and in digits on the other scores as equal. Each language's number rule (``number_rule``):

- English (``whisper-english``): lowercase, drop bracketed asides, spell symbols, strip
  punctuation, and write number words as digits the way Whisper's English normaliser does.
- French, Spanish, Portuguese, German, Dutch, Italian, Danish (``text2num``): number words
  written as digits by text2num's ``alpha2digit`` ("veintiuno" -> "21", "dos mil quince" ->
  "2015"), then the basic normaliser. Isolated numbers below 3 stay words, as text2num does by
  default: "un", "una", "ein" are articles far more often than counts.
- Chinese (``cn2an``): Traditional -> Simplified (OpenCC t2s), Chinese numerals written as
  Arabic digits by cn2an (years read digit by digit, "二零一五年" -> "2015年", and values,
  "十五" -> "15"), punctuation and spaces removed; scored by characters.
- Everything else: Whisper's basic normaliser (lowercase, punctuation and symbols removed), with
  no number rule: words and digits then differ.
"""

from __future__ import annotations

import functools
import re
import unicodedata
import warnings
from collections.abc import Callable

# Languages written without spaces between words: scored by characters (CER is the headline).
CHARACTER_LANGUAGES = frozenset({"zh", "yue", "ja", "th", "lo", "my", "km", "bo"})
# The languages text2num's alpha2digit reads.
TEXT2NUM_LANGUAGES = frozenset({"fr", "es", "pt", "de", "nl", "it", "da"})
CHINESE_LANGUAGES = frozenset({"zh", "yue"})

_BRACKETS = re.compile(r"[<\[][^>\]]*[>\]]|\([^)]*\)")
_SPACES = re.compile(r"\s+")
# "1.000", "1,000" and "1 000" (thousands, as each language writes them) are one number.
_DIGIT_GROUP = re.compile(r"(?<=\d)[.,\u00a0\u202f ](?=\d{3}(?!\d))")


def is_character_language(language: str | None) -> bool:
    return (language or "").lower() in CHARACTER_LANGUAGES


def number_rule(language: str | None) -> str | None:
    """How numbers are made comparable for ``language``: ``whisper-english``, ``text2num``,
    ``cn2an``, or None when words and digits are left as written."""
    code = (language or "").lower()
    if code == "en":
        return "whisper-english"
    if code in TEXT2NUM_LANGUAGES:
        return "text2num"
    if code in CHINESE_LANGUAGES:
        return "cn2an"
    return None


def normalizer_for(language: str | None) -> Callable[[str], str]:
    """The normaliser for a Whisper language code (None: the basic one)."""
    code = (language or "").lower()
    if code == "en":
        return normalize_english
    if code in CHINESE_LANGUAGES:
        return normalize_chinese
    if code in TEXT2NUM_LANGUAGES:
        return _text2num_normalizer(code)
    if code in CHARACTER_LANGUAGES:
        return normalize_characters
    return normalize_basic


def normalize_basic(text: str) -> str:
    """Lowercase, drop bracketed asides, replace punctuation, marks and symbols with spaces."""
    text = _BRACKETS.sub(" ", unicodedata.normalize("NFKC", text).lower())
    text = "".join(" " if unicodedata.category(ch)[0] in "PSC" else ch for ch in text)
    return _SPACES.sub(" ", text).strip()


def normalize_characters(text: str) -> str:
    """The basic normaliser without spaces: for languages scored by characters."""
    return normalize_basic(text).replace(" ", "")


@functools.cache
def _text2num_normalizer(language: str) -> Callable[[str], str]:
    def normalize(text: str) -> str:
        return normalize_with_numbers(text, language)

    normalize.__name__ = f"normalize_{language}"
    return normalize


def normalize_with_numbers(text: str, language: str) -> str:
    """The basic normaliser after text2num wrote ``language``'s number words as digits."""
    from text_to_num import alpha2digit

    text = _BRACKETS.sub(" ", unicodedata.normalize("NFKC", text).lower())
    text = _DIGIT_GROUP.sub("", text)
    return normalize_basic(alpha2digit(text, language))


@functools.lru_cache(maxsize=1)
def _t2s() -> Callable[[str], str]:
    import opencc

    return opencc.OpenCC("t2s").convert


def normalize_chinese(text: str) -> str:
    """Simplified characters, Chinese numerals as Arabic digits, no punctuation or spaces."""
    import cn2an

    text = _DIGIT_GROUP.sub("", _t2s()(unicodedata.normalize("NFKC", text)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cn2an warns about each numeral it cannot read, and leaves it
        text = cn2an.transform(text, "cn2an")
    # A run cn2an cannot read as one number (the counting "一二三四五六七八九十") is read numeral by numeral.
    text = _CHINESE_NUMERAL_RUN.sub(lambda m: "".join(_CHINESE_NUMERALS[ch] for ch in m[0]), text)
    return normalize_characters(text)


_CHINESE_NUMERALS = {**{ch: str(i) for i, ch in enumerate("零一二三四五六七八九")}, "〇": "0", "两": "2", "十": "10"}
_CHINESE_NUMERAL_RUN = re.compile(f"[{''.join(_CHINESE_NUMERALS)}]{{2,}}")


# ---------------------------------------------------------------------------------------- English

_UNITS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen".split()
    )
}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
_SCALES = {"thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
_SYMBOLS = {"%": " percent ", "&": " and ", "+": " plus ", "@": " at "}
_CURRENCY = re.compile(r"([$£€])\s*(\d[\d,]*(?:\.\d+)?)")
_CURRENCY_WORDS = {"$": "dollars", "£": "pounds", "€": "euros"}
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
# Keep "3.5" and "1,000" together while other punctuation goes.
_NON_WORD = re.compile(r"(?<!\d)[.,](?!\d)|[^\w\s.,']|(?<=\d)[.,](?!\d)|(?<!\d)[.,](?=\d)")


def normalize_english(text: str) -> str:
    """Whisper-style English normalisation, compact: case, punctuation, symbols and numbers."""
    text = _BRACKETS.sub(" ", unicodedata.normalize("NFKC", text).lower())
    text = _CURRENCY.sub(lambda m: f"{m.group(2)} {_CURRENCY_WORDS[m.group(1)]}", text)
    for symbol, word in _SYMBOLS.items():
        text = text.replace(symbol, word)
    text = _DIGIT_COMMA.sub("", text)
    text = text.replace("-", " ")
    text = _NON_WORD.sub(" ", text)
    text = re.sub(r"'s\b", "s", text).replace("'", "")
    return " ".join(_words_to_digits(text.split()))


def _words_to_digits(words: list[str]) -> list[str]:
    """Replace runs of number words by digits: "twenty one" -> "21", "one two" -> "1 2"."""
    out: list[str] = []
    parser = _NumberParser(out)
    for i, word in enumerate(words):
        following = words[i + 1] if i + 1 < len(words) else ""
        if word == "and" and parser.after_magnitude() and _is_number_word(following):
            continue  # "one hundred and five"
        if not parser.feed(word):
            parser.flush()
            out.append(word)
    parser.flush()
    return out


def _is_number_word(word: str) -> bool:
    return word in _UNITS or word in _TENS or word in _SCALES or word == "hundred"


class _NumberParser:
    """Accumulate one number from words; a word that cannot continue it starts a new one."""

    def __init__(self, out: list[str]):
        self.out = out
        self.total = 0  # thousands and above
        self.current = 0  # below a thousand
        self.last: str | None = None  # kind of the last word: unit, teen, tens, hundred, scale
        self.prefix = ""  # the "19" of "nineteen ninety nine" (years are read in pairs)

    def after_magnitude(self) -> bool:
        return self.last in ("hundred", "scale")

    def feed(self, word: str) -> bool:
        if word in _UNITS:
            value = _UNITS[word]
            kind = "unit" if value < 10 else "teen"
            fits = self.last in (None, "hundred", "scale") or (self.last == "tens" and 0 < value < 10)
            if not fits:
                self.flush()
            self.current += value
            self.last = kind
        elif word in _TENS:
            if self.last == "teen" or (self.last in ("unit", "tens") and 20 <= self.current < 100 and not self.total):
                if self.prefix or self.total:
                    self.flush()
                else:  # a year: "nineteen ninety", "twenty twenty four"
                    self.prefix, self.current = str(self.current), 0
            elif self.last not in (None, "hundred", "scale"):
                self.flush()
            self.current += _TENS[word]
            self.last = "tens"
        elif word == "hundred":
            if self.last in ("hundred", "scale") or (self.last is not None and self.current % 100 != self.current):
                self.flush()
            self.current = (self.current or 1) * 100
            self.last = "hundred"
        elif word in _SCALES:
            if self.last == "scale":
                self.flush()
            self.total += (self.current or 1) * _SCALES[word]
            self.current = 0
            self.last = "scale"
        else:
            return False
        return True

    def flush(self) -> None:
        if self.last is not None:
            value = self.total + self.current
            self.out.append(f"{self.prefix}{value:02d}" if self.prefix else str(value))
        self.total, self.current, self.last, self.prefix = 0, 0, None, ""
