"""Verifiable instruction tasks, generated on the fly: the embedded data set for SFT and RLHF.

Every record is Alpaca-style, {"instruction", "input", "output", "task"}, and its answer can
be checked by exact match, so a model's accuracy is a real number, not a judgement. The
answers are short (a number, a word or a few words) so a tiny model can learn them.

    add, subtract, max, min             numbers below 100
    reverse_words, sort_words           2-4 short words
    sort_digits                         3-6 digits
    count_words, count_letter           small counts
    uppercase, lowercase                1-3 words
    commas_to_spaces, spaces_to_commas  "a,b,c" <-> "a b c"
    first_word, last_word               2-5 words

Splits are disjoint by construction: a record belongs to train, val or test by the hash of
its prompt (instruction + input), so a test prompt can never appear in training, whatever
the seed or the number of records asked for. `wrong_answer` makes a plausible mistake for a
record (off by one, two words swapped, one word left unconverted), which gives preference
pairs with a known winner for reward modelling and DPO.
"""
import hashlib
import random
import re
from decimal import Decimal

from tritongpt.errors import UserError

WORDS = ("cat", "dog", "sun", "red", "blue", "tree", "fish", "bird", "moon", "star", "milk", "book",
         "lamp", "rain", "snow", "wind", "rock", "leaf", "frog", "bear", "cake", "door", "ship", "king",
         "gold", "road", "hill", "lake", "rose", "wolf")
LETTERS = "abcd"
SPLITS = {"train": (0.0, 0.8), "val": (0.8, 0.9), "test": (0.9, 1.0)}


# -- the task families: rng -> (instruction, input, output) --------------------------------------
def _numbers(rng, k):
    return [rng.randrange(100) for _ in range(k)]


def _words(rng, lo, hi, distinct=False):
    k = rng.randint(lo, hi)
    return rng.sample(WORDS, k) if distinct else [rng.choice(WORDS) for _ in range(k)]


def _add(rng):
    a, b = _numbers(rng, 2)
    return "Add the two numbers.", f"{a} {b}", str(a + b)


def _subtract(rng):
    a, b = sorted(_numbers(rng, 2), reverse=True)
    return "Subtract the second number from the first.", f"{a} {b}", str(a - b)


def _max(rng):
    xs = _numbers(rng, rng.randint(3, 5))
    return "Give the largest number.", " ".join(map(str, xs)), str(max(xs))


def _min(rng):
    xs = _numbers(rng, rng.randint(3, 5))
    return "Give the smallest number.", " ".join(map(str, xs)), str(min(xs))


def _reverse_words(rng):
    ws = _words(rng, 2, 4)
    return "Reverse the order of the words.", " ".join(ws), " ".join(reversed(ws))


def _sort_words(rng):
    ws = _words(rng, 2, 4, distinct=True)
    return "Sort the words alphabetically.", " ".join(ws), " ".join(sorted(ws))


def _sort_digits(rng):
    ds = [str(rng.randrange(10)) for _ in range(rng.randint(3, 6))]
    return "Sort the digits from smallest to largest.", " ".join(ds), " ".join(sorted(ds))


def _count_words(rng):
    ws = _words(rng, 1, 6)
    return "Count the words.", " ".join(ws), str(len(ws))


def _count_letter(rng):
    s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 8)))
    c = rng.choice(LETTERS)
    return f"Count the letter {c} in the text.", s, str(s.count(c))


def _uppercase(rng):
    ws = _words(rng, 1, 3)
    return "Convert the words to uppercase.", " ".join(ws), " ".join(ws).upper()


def _lowercase(rng):
    ws = _words(rng, 1, 3)
    return "Convert the words to lowercase.", " ".join(ws).upper(), " ".join(ws)


def _commas_to_spaces(rng):
    ws = _words(rng, 2, 4)
    return "Replace the commas with spaces.", ",".join(ws), " ".join(ws)


def _spaces_to_commas(rng):
    ws = _words(rng, 2, 4)
    return "Join the words with commas.", " ".join(ws), ",".join(ws)


def _first_word(rng):
    ws = _words(rng, 2, 5)
    return "Give the first word.", " ".join(ws), ws[0]


def _last_word(rng):
    ws = _words(rng, 2, 5)
    return "Give the last word.", " ".join(ws), ws[-1]


FAMILIES = {
    "add": _add, "subtract": _subtract, "max": _max, "min": _min,
    "reverse_words": _reverse_words, "sort_words": _sort_words, "sort_digits": _sort_digits,
    "count_words": _count_words, "count_letter": _count_letter,
    "uppercase": _uppercase, "lowercase": _lowercase,
    "commas_to_spaces": _commas_to_spaces, "spaces_to_commas": _spaces_to_commas,
    "first_word": _first_word, "last_word": _last_word,
}


def parse_families(spec) -> tuple:
    """None / "all" -> every family; a comma string or a list -> those, checked."""
    if spec is None or spec == "all" or spec == "":
        return tuple(FAMILIES)
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise UserError(f"unknown task famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                        f"choose from: {', '.join(FAMILIES)}")
    return tuple(dict.fromkeys(names))


# -- splits, generation, checking ------------------------------------------------------------------
def unit_hash(text: str) -> float:
    """A number in [0, 1) fixed by the text: same text, same number, on every machine."""
    # 53 bits, as many as a float holds: 64 bits over 2**64 round to 1.0 for the top 2**10 values,
    # and split_of would find no split for such a prompt
    return (int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 11) / 2**53


def prompt_key(record) -> str:
    return f"{record['instruction']}\n{record.get('input', '')}"


def prompt_hash(record) -> float:
    """A number in [0, 1) fixed by the prompt (instruction + input): same prompt, same number."""
    return unit_hash(prompt_key(record))


def split_of(record) -> str:
    """"train" | "val" | "test", fixed by the hash of the prompt."""
    u = prompt_hash(record)
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= u < hi)


def generate_tasks(n: int, seed: int = 0, split: str = "train", families=None) -> list:
    """n distinct records of the given split; same seed, same list.

    Each draw picks a family uniformly and a repeated prompt is dropped, so families with few distinct prompts
    lose more draws: of the default 5,000 train records, uppercase/lowercase (a third of their inputs one of 30
    words) get ~255 each against up to ~385 for the others. Redrawing within the family would even that out, but
    would change every seed's records, and with them the runs and figures made on them.

    split=None draws from all three splits (each record still has a fixed split by its hash).
    """
    if split is not None and split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {list(SPLITS)}")
    if n < 0:
        raise UserError(f"number of task records must be >= 0, got {n}")
    fams = parse_families(families)
    rng = random.Random(f"tritongpt-tasks:{seed}:{split}:{','.join(fams)}")
    out, seen, tries = [], set(), 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise UserError(f"could only make {len(out)} distinct {split} records of {list(fams)}; "
                            f"ask for fewer or add families")
        task = rng.choice(fams)
        instruction, inp, output = FAMILIES[task](rng)
        rec = {"instruction": instruction, "input": inp, "output": output, "task": task}
        key = (instruction, inp)
        if key in seen or (split is not None and split_of(rec) != split):
            continue
        seen.add(key)
        out.append(rec)
    return out


def exact_match(pred, gold) -> bool:
    """The verifier: equal after stripping surrounding whitespace."""
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    return pred.strip() == gold.strip()


# a number as people write one: 1234, 1,234, -3, 0.5 (thousands commas only in groups of three)
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def last_number(text):
    """The last number in a text, as a Decimal (so 72, 72.0 and 72.00 are one number), or None."""
    found = NUMBER.findall(text) if isinstance(text, str) else []
    return Decimal(found[-1].replace(",", "")) if found else None


def number_match(pred, gold) -> bool:
    """The math verifier: the response's last number is the reference's last number. A GSM8K
    answer ends with `#### 72`, and the last number of a worked answer is its result, as
    lm-eval-harness's flexible extract reads GSM8K; the reasoning before it is not judged."""
    want = last_number(gold)
    return want is not None and last_number(pred) == want


# -- plausible wrong answers (for preference pairs) ------------------------------------------------
def _off_by_one(num: str, rng) -> str:
    n = int(num)
    return str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)


def _swap_two(items: list, rng, sep: str) -> str | None:
    """Swap two unequal items (a 'partially sorted' / 'partially reversed' list)."""
    pairs = [(i, j) for i in range(len(items)) for j in range(i + 1, len(items)) if items[i] != items[j]]
    if not pairs:
        return None
    i, j = rng.choice(pairs)
    items = list(items)
    items[i], items[j] = items[j], items[i]
    return sep.join(items)


def _other_word(word: str, rng, pool=()) -> str:
    choices = [w for w in (list(pool) or WORDS) if w != word] or [w for w in WORDS if w != word]
    return rng.choice(choices)


def wrong_answer(record, rng: random.Random) -> str:
    """A plausible but wrong output for `record` (never equal to the gold one after strip).

    Known families make family-typical mistakes; other records (e.g. from a file) get a
    generic one: a number off by one, two words swapped (or, when all the words are the same, the
    last one dropped), or a single word replaced.
    """
    gold, inp, task = record["output"], record.get("input", ""), record.get("task")
    wrong = None
    if task in ("add", "subtract", "max", "min", "count_words", "count_letter"):
        if task in ("max", "min") and rng.random() < 0.5:
            others = [x for x in inp.split() if x != gold]
            wrong = rng.choice(others) if others else None  # a number from the list, not the extreme
        wrong = wrong or _off_by_one(gold, rng)
    elif task in ("reverse_words", "sort_words", "sort_digits"):
        wrong = _swap_two(gold.split(), rng, " ") if rng.random() < 0.7 else inp
    elif task in ("uppercase", "lowercase"):
        ws, conv = gold.split(), inp.split()
        i = rng.randrange(len(ws))
        wrong = " ".join(conv[i] if k == i else w for k, w in enumerate(ws))  # one word left as it was
    elif task in ("commas_to_spaces", "spaces_to_commas"):
        old, new = ("," , " ") if task == "commas_to_spaces" else (" ", ",")
        # half converted when there are 3+ words, else not converted at all
        wrong = inp.replace(old, new, 1) if inp.count(old) >= 2 and rng.random() < 0.5 else inp
    elif task in ("first_word", "last_word"):
        wrong = _other_word(gold, rng, inp.split())
    if wrong is None or exact_match(wrong, gold):
        wrong = _generic_wrong(gold, rng)
    return wrong


def _generic_wrong(gold: str, rng) -> str:
    s = gold.strip()
    # an integer as int() reads one: str.isdigit also takes "²" and lstrip("-") "--5", which it refuses
    if re.fullmatch(r"-?\d+", s):
        return _off_by_one(s, rng)
    words = s.split()
    if len(words) > 1:
        swapped = _swap_two(words, rng, " ")
        if swapped is not None:
            return swapped
        return " ".join(words[:-1])
    if s:
        w = _other_word(s, rng)
        return w if w != s else s + s
    return "no"
