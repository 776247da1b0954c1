"""Wordings of the passkey task: many ways to state a value and ask for it, split into training and
held-out families by a fixed rule, and the value kinds they state.

A **wording family** (:class:`Wording`) is a key-sentence template, a question template and an answer
prefix that the question ends with (``"What is the locker code?"`` + ``"The locker code is"``; the model
then answers ``" 48213."``). Templates hold ``{value}`` and an owner, so one family serves both tasks:

* ``{whose}`` / ``{Whose}``: ``the`` / ``The`` in a passkey prompt, ``Priya's`` in a multikey prompt;
* ``{of}``: nothing in a passkey prompt, `` for Priya`` in a multikey prompt.

The paper's wording (:data:`PAPER`) is the family ``paper``; with the paper's set the prompts are exactly
those of :data:`landmark.data.passkey.KEY_SENTENCE`, ``QUESTION`` and their named forms.

**Value kinds** (:data:`KINDS`): integers of 5, 6 and 7 digits, common nouns, UUIDs, person names and
dates (``14 March 2031``). A family states one or several kinds; each kind draws its values from a
seeded generator and has its own matcher (:meth:`Kind.find`): the first integer (numbers), the first
word, case-insensitive (words and names), the first UUID-shaped token (UUIDs), the date at the start
(dates). A generation is correct when what the matcher finds equals what it finds in the value itself.

**The split rule**: the family at index ``i`` of :data:`FAMILIES` is held out when ``i % 3 == 2``
(:func:`is_held_out`), a training family otherwise. Families are only ever appended to the table, so a
family's split never changes. The wording sets (:data:`WORDING_SETS`): ``paper`` (the paper's family
alone, the default), ``train`` (the training families), ``held-out`` and ``all`` (both).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

WORDING_SETS = ("paper", "train", "held-out", "all")
TRAINING_WORDINGS = ("paper", "train")  # what a training mix may draw from (never held-out)
HELD_OUT_EVERY = 3  # the family at index i is held out when i % HELD_OUT_EVERY == HELD_OUT_AT
HELD_OUT_AT = 2

WORDS = (
    "anchor", "basket", "candle", "window", "harbor", "pencil", "garden", "ladder", "mirror", "rocket",
    "saddle", "teapot", "violin", "walnut", "bridge", "castle", "helmet", "island", "jacket", "kettle",
    "lemon", "marble", "needle", "orange", "pillow", "quilt", "ribbon", "silver", "tunnel", "wagon",
    "barrel", "button", "cactus", "feather", "forest", "hammer", "lantern", "magnet", "parrot", "velvet",
)  # fmt: skip
# values of the name kind; none is an owner of multikey's keys (landmark.data.passkey.NAMES)
PERSONS = (
    "Adaeze", "Benedikt", "Camila", "Dario", "Esther", "Fabian", "Gulnara", "Henrik", "Isolde", "Jasper",
    "Kalinda", "Lorenzo", "Mireille", "Nikolai", "Ottilie", "Pavel", "Quentin", "Rashida", "Stellan",
    "Thandiwe", "Ulrich", "Valentina", "Wendell", "Ximena", "Yusuf", "Zofia",
)  # fmt: skip
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
)  # fmt: skip
YEARS = (2024, 2049)  # dates lie in these years (inclusive)


def _number(digits: int) -> Callable[[np.random.Generator], str]:
    return lambda rng: str(int(rng.integers(10 ** (digits - 1), 10**digits)))


def _pick(values: tuple[str, ...]) -> Callable[[np.random.Generator], str]:
    return lambda rng: str(values[int(rng.integers(len(values)))])


def _uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _date(rng: np.random.Generator) -> str:
    day, month = int(rng.integers(1, 29)), MONTHS[int(rng.integers(12))]
    return f"{day} {month} {int(rng.integers(YEARS[0], YEARS[1] + 1))}"


_INTEGER = re.compile(r"\d+")
_WORD = re.compile(r"[^\W_]+")
_UUID = re.compile(r"(?<![0-9A-Za-z-])[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}(?![0-9A-Za-z-])")
_MONTH = "|".join(MONTHS)
_DATE_DMY = re.compile(rf"[\s\"'(“]*(\d{{1,2}})(?:st|nd|rd|th)?\s+({_MONTH}),?\s+(\d{{4}})(?!\d)", re.I)
_DATE_MDY = re.compile(rf"[\s\"'(“]*({_MONTH})\s+(\d{{1,2}})(?:st|nd|rd|th)?,?\s+(\d{{4}})(?!\d)", re.I)


def first_integer(text: str) -> int | None:
    """The first integer in ``text`` (what the model answered), or None."""
    m = _INTEGER.search(text)
    return int(m.group()) if m else None


def first_word(text: str) -> str | None:
    """The first word of ``text`` (a run of letters and digits), lower-cased, or None."""
    m = _WORD.search(text)
    return m.group().lower() if m else None


def first_uuid(text: str) -> str | None:
    """The first UUID-shaped token of ``text``, lower-cased, or None."""
    m = _UUID.search(text)
    return m.group().lower() if m else None


def leading_date(text: str) -> str | None:
    """The date ``text`` starts with (``14 March 2031``, ``14th March, 2031``, ``March 14, 2031``) as
    ``YYYY-MM-DD``, or None."""
    m = _DATE_DMY.match(text)
    if m:
        day, month, year = m.group(1), m.group(2), m.group(3)
    else:
        m = _DATE_MDY.match(text)
        if not m:
            return None
        month, day, year = m.group(1), m.group(2), m.group(3)
    index = [x.lower() for x in MONTHS].index(month.lower()) + 1
    return f"{int(year):04d}-{index:02d}-{int(day):02d}"


@dataclass(frozen=True)
class Kind:
    """A kind of value: how it is drawn and how an answer is read."""

    name: str
    draw: Callable[[np.random.Generator], str]
    find: Callable[[str], int | str | None]  # what an answer holds, comparable with find(" " + value)

    def correct(self, text: str, value: int | str) -> bool:
        """Whether the answer ``text`` states ``value``."""
        found = self.find(text)
        return found is not None and found == self.find(f" {value}")


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("number5", _number(5), first_integer),
        Kind("number6", _number(6), first_integer),
        Kind("number7", _number(7), first_integer),
        Kind("word", _pick(WORDS), first_word),
        Kind("uuid", _uuid, first_uuid),
        Kind("name", _pick(PERSONS), first_word),
        Kind("date", _date, leading_date),
    )
}
NUMBERS = ("number5", "number6", "number7")
PAPER_KIND = "number5"  # the paper's five-digit keys


@dataclass(frozen=True)
class Wording:
    """A wording family: templates with ``{value}``, ``{whose}``/``{Whose}`` and ``{of}`` (see the module
    docstring), the value kinds it states, and the thing it asks for."""

    name: str
    thing: str
    kinds: tuple[str, ...]
    key: str
    question: str
    answer: str

    def _owner(self, owner: str | None) -> dict[str, str]:
        if owner is None:
            return {"whose": "the", "Whose": "The", "of": ""}
        return {"whose": f"{owner}'s", "Whose": f"{owner}'s", "of": f" for {owner}"}

    def key_text(self, value: int | str, owner: str | None = None) -> str:
        """The key sentence stating ``value`` (of ``owner`` in a multikey prompt)."""
        return self.key.format(value=value, **self._owner(owner))

    def question_text(self, owner: str | None = None, answer: bool = True) -> str:
        """The question and (``answer``) the answer prefix it ends with (the prompt's last words)."""
        words = self._owner(owner)
        return " ".join(x.format(**words) for x in (self.question, self.answer if answer else "") if x)

    def answer_text(self, owner: str | None = None) -> str:
        """The answer prefix alone (``"The locker code is"``; may be empty)."""
        return self.answer.format(**self._owner(owner))


PAPER = Wording(
    "paper", "pass key", ("number5",),
    "The pass key{of} is {value}. Remember it. {value} is the pass key{of}.",
    "What is the pass key{of}?", "The pass key{of} is",
)  # fmt: skip

# Only ever append: a family's split is its index's (is_held_out). Registers vary: plain statements,
# notes, dialogue, list items, e-mails, chat turns, "Question: ... Answer:".
FAMILIES: tuple[Wording, ...] = (
    Wording("locker", "locker code", NUMBERS,
            "{Whose} locker code is {value}.",
            "What is {whose} locker code?", "{Whose} locker code is"),
    Wording("door-note", "door code", NUMBERS,
            "Note to self: the door code{of} is {value}, do not lose it.",
            "Question: what is the door code{of}?", "Answer:"),
    Wording("account-email", "account number", NUMBERS,
            "Dear customer, we confirm that {whose} account number is {value}. Kind regards, the bank.",
            "According to the bank's letter, which account number was confirmed{of}?",
            "The confirmed account number is"),
    Wording("secret-word", "secret word", ("word",),
            '"Listen carefully," she whispered, "the secret word{of} is {value}."',
            "Which secret word did she whisper{of}?", "She whispered"),
    Wording("order-list", "order id", ("uuid",),
            "- order id{of}: {value}",
            "Look up the order id{of} in the list above.", "Order id:"),
    Wording("meeting-date", "meeting date", ("date",),
            "We agreed that {whose} meeting will take place on {value}.",
            "On which date will {whose} meeting take place?", "It will take place on"),
    Wording("courier", "courier's name", ("name",),
            "The parcel{of} will be brought by a courier called {value}.",
            "What is the name of the courier who brings the parcel{of}?", "The courier is called"),
    Wording("pin-chat", "PIN", NUMBERS,
            "User: Please remember the PIN{of}: {value}. Assistant: Understood, I will remember it.",
            "User: Which PIN did I ask you to remember{of}? Assistant:", "The PIN is"),
    Wording("ticket-record", "ticket number", ("uuid",),
            "Support record. Ticket{of} opened with reference {value}.",
            "Quote the reference of the support ticket{of}.", "Reference:"),
    Wording("password-word", "password", ("word",),
            "For the club{of}, the password this week is the word {value}.",
            "Question: what is this week's password for the club{of}? Answer:", "The password is"),
    Wording("deadline", "deadline", ("date",),
            "Reminder: the report{of} is due on {value}.",
            "When is the report{of} due?", "The report is due on"),
    Wording("guest-name", "guest's name", ("name",),
            "At the front desk, the guest{of} signed in as {value}.",
            "Under which name did the guest{of} sign in?", "The guest signed in as"),
    Wording("serial", "serial number", NUMBERS,
            "Item 4: a laptop{of}, serial number {value}, checked and working.",
            "What serial number does the laptop{of} have?", "Its serial number is"),
    Wording("codeword-dialogue", "code word", ("word",),
            '"What do we say at the gate{of}?" asked the guard. "We say {value}," came the answer.',
            "What is the code word to say at the gate{of}?", "The code word is"),
    Wording("flight-date", "flight date", ("date",),
            "Booking confirmed: the flight{of} departs on {value}.",
            "Question: on what date does the flight{of} depart? Answer:", "It departs on"),
    Wording("badge-number", "badge number", NUMBERS,
            "Security desk log: {whose} visitor badge carries the number {value}.",
            "Which number is printed on {whose} visitor badge?", "The badge number is"),
    Wording("session-token", "session token", ("uuid",),
            "System message: the session token{of} was set to {value}.",
            "What was the session token{of} set to?", "It was set to"),
    Wording("pilot-name", "pilot's name", ("name",),
            "Hi team, quick update: the pilot{of} tomorrow will be {value}. Thanks!",
            "Who will be the pilot{of} tomorrow, according to the update?", "The pilot will be"),
    Wording("safe-combination", "safe combination", NUMBERS,
            "Scribbled on a scrap of paper{of}: safe combination {value}.",
            "What combination opens the safe{of}?", "The combination is"),
    Wording("shipment-id", "shipment id", ("uuid",),
            "Your shipment{of} is on its way; track it with the id {value}.",
            "Which id tracks the shipment{of}?", "The tracking id is"),
    Wording("favourite-thing", "favourite word", ("word",),
            "Fun fact{of}: the favourite word of our teacher is {value}.",
            "Which word does the teacher{of} like best?", "The teacher likes the word"),
    Wording("birthday", "birthday", ("date",),
            "Family calendar{of}: grandmother was born on {value}.",
            "On which day was grandmother{of} born?", "She was born on"),
    Wording("phone-extension", "phone extension", NUMBERS,
            "To reach the archive{of}, dial extension {value} from any office phone.",
            "Question: which extension reaches the archive{of}? Answer:", "Extension"),
    Wording("captain-name", "captain's name", ("name",),
            "Crew list{of}: the ship is commanded by Captain {value}.",
            "Who commands the ship{of}?", "Captain"),
)  # fmt: skip


def is_held_out(index: int) -> bool:
    """The split rule: the family at ``index`` of :data:`FAMILIES` is held out when
    ``index % 3 == 2``."""
    return index % HELD_OUT_EVERY == HELD_OUT_AT


def families(wording_set: str) -> tuple[Wording, ...]:
    """The families of a wording set (:data:`WORDING_SETS`), in table order.

    Raises:
        ValueError: an unknown set.
    """
    if wording_set not in WORDING_SETS:
        raise ValueError(f"wording set must be one of {', '.join(WORDING_SETS)}; got {wording_set!r}")
    if wording_set == "paper":
        return (PAPER,)
    want = {"train": (False,), "held-out": (True,), "all": (False, True)}[wording_set]
    return tuple(w for i, w in enumerate(FAMILIES) if is_held_out(i) in want)


HELD_OUT_NAMES = frozenset(w.name for i, w in enumerate(FAMILIES) if is_held_out(i))


def held_out(family: str) -> bool:
    """Whether the family called ``family`` is a held-out one."""
    return family in HELD_OUT_NAMES


def fingerprint(wording_set: str) -> str:
    """A short hash of a set's families (templates and kinds): part of a cell's cache key, so that an
    edited family never reads the cells of its earlier text."""
    text = json.dumps([[w.name, w.kinds, w.key, w.question, w.answer] for w in families(wording_set)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def draw_wording(rng: np.random.Generator, wording_set: str) -> tuple[Wording, Kind, str]:
    """A family of the set, one of its value kinds, and a value of that kind, drawn from ``rng``."""
    options = families(wording_set)
    family = options[int(rng.integers(len(options)))]
    kind = KINDS[family.kinds[int(rng.integers(len(family.kinds)))]]
    return family, kind, kind.draw(rng)
