"""A seeded generator of English-like sentences with number agreement, and minimal pairs from it.

The toy corpus stands in for the Pile: every sentence obeys number agreement between
- a determiner and its noun (this/these, that/those, a/some),
- a subject and its verb, directly, across a prepositional phrase (distractor noun) and across an
  object relative clause (distractor noun that is itself a subject),
- a subject and its reflexive anaphor (himself/herself/itself vs themselves),
with regular and irregular plurals. The same vocabulary writes minimal-pair tasks in BLiMP's native
JSONL format, so the toy family is scored exactly like a real one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# (singular, plural, reflexive of the singular)
REGULAR_NOUNS = [
    ("dog", "dogs", "itself"), ("cat", "cats", "itself"), ("bird", "birds", "itself"),
    ("horse", "horses", "itself"), ("teacher", "teachers", "herself"),
    ("doctor", "doctors", "himself"), ("farmer", "farmers", "himself"),
    ("student", "students", "herself"), ("girl", "girls", "herself"), ("boy", "boys", "himself"),
    ("king", "kings", "himself"), ("queen", "queens", "herself"), ("pilot", "pilots", "himself"),
    ("singer", "singers", "herself"), ("baker", "bakers", "himself"), ("nurse", "nurses", "herself"),
]
IRREGULAR_NOUNS = [
    ("man", "men", "himself"), ("woman", "women", "herself"), ("child", "children", "herself"),
    ("person", "people", "himself"), ("mouse", "mice", "itself"), ("goose", "geese", "itself"),
]
OBJECTS = [("car", "cars"), ("book", "books"), ("house", "houses"), ("tree", "trees"),
           ("box", "boxes"), ("song", "songs")]
# (singular form, plural form) of agreeing verbs
INTRANSITIVE = [("is", "are"), ("was", "were"), ("runs", "run"), ("sleeps", "sleep"),
                ("sings", "sing"), ("waits", "wait")]
TRANSITIVE = [("likes", "like"), ("sees", "see"), ("helps", "help"), ("knows", "know"),
              ("chases", "chase")]
REFLEXIVE_VERBS = ["saw", "hurt", "liked", "helped"]
ADJECTIVES = ["happy", "tired", "here", "old", "small", "quiet"]
PREPOSITIONS = ["near", "behind", "with", "beside"]
# determiners by number
DET_SG = ["the", "this", "that", "a"]
DET_PL = ["the", "these", "those", "some"]
FILLERS = ["today", "again", "now", "outside"]

NOUNS = REGULAR_NOUNS + IRREGULAR_NOUNS


@dataclass(frozen=True)
class NounPhrase:
    text: str
    plural: bool
    reflexive: str


def _noun(rng: random.Random, plural: bool, nouns=NOUNS, det: str | None = None) -> NounPhrase:
    sg, pl, refl = rng.choice(nouns)
    det = det or rng.choice(DET_PL if plural else DET_SG)
    return NounPhrase(f"{det} {pl if plural else sg}", plural, "themselves" if plural else refl)


def _verb(pair: tuple[str, str], plural: bool) -> str:
    return pair[1] if plural else pair[0]


def _pick_plural(rng: random.Random) -> bool:
    return rng.random() < 0.5


class Grammar:
    """Sentence and minimal-pair generator over a fixed vocabulary; all randomness from one seed."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    # -- subjects -----------------------------------------------------------------------------
    def subject(self, kind: str) -> tuple[str, bool, str]:
        """Return (subject text, plural?, reflexive) for a subject of the given kind."""
        rng = self.rng
        head = _noun(rng, _pick_plural(rng))
        match kind:
            case "simple":
                text = head.text
            case "pp":
                dist = _noun(rng, _pick_plural(rng), det="the")
                text = f"{head.text} {rng.choice(PREPOSITIONS)} {dist.text}"
            case "rc":
                dist = _noun(rng, _pick_plural(rng), det="the")
                text = f"{head.text} that {dist.text} {_verb(rng.choice(TRANSITIVE), dist.plural)}"
            case other:
                raise ValueError(f"unknown subject kind {other!r}")
        return text, head.plural, head.reflexive

    def predicate(self, plural: bool, reflexive: str) -> str:
        rng = self.rng
        r = rng.random()
        if r < 0.35:
            pair = rng.choice(INTRANSITIVE[:2])
            return f"{_verb(pair, plural)} {rng.choice(ADJECTIVES)}"
        if r < 0.55:
            return f"{_verb(rng.choice(INTRANSITIVE[2:]), plural)} {rng.choice(FILLERS)}"
        if r < 0.8:
            obj_pl = _pick_plural(rng)
            sg, pl = rng.choice(OBJECTS)
            det = rng.choice(DET_PL if obj_pl else DET_SG)
            return f"{_verb(rng.choice(TRANSITIVE), plural)} {det} {pl if obj_pl else sg}"
        return f"{rng.choice(REFLEXIVE_VERBS)} {reflexive}"

    def sentence(self) -> str:
        kind = self.rng.choices(["simple", "pp", "rc"], weights=[0.5, 0.25, 0.25])[0]
        subj, plural, refl = self.subject(kind)
        text = f"{subj} {self.predicate(plural, refl)} ."
        return text[0].upper() + text[1:]

    def document(self, n_sentences: int) -> str:
        return " ".join(self.sentence() for _ in range(n_sentences))


# -- minimal pairs in BLiMP's native format ---------------------------------------------------

PARADIGMS = {
    # uid: (linguistics_term, field)
    "simple_agreement": ("subject_verb_agreement", "morphology"),
    "agreement_across_pp": ("subject_verb_agreement", "syntax"),
    "agreement_across_relative_clause": ("subject_verb_agreement", "syntax"),
    "irregular_plural_agreement": ("subject_verb_agreement", "morphology"),
    "determiner_noun_agreement": ("determiner_noun_agreement", "morphology"),
    "anaphor_number_agreement": ("anaphor_agreement", "morphology"),
}


def _blimp_row(uid: str, pair_id: int, prefix: str, good: str, bad: str, rest: str) -> dict:
    term, field = PARADIGMS[uid]
    cap = prefix[0].upper() + prefix[1:]
    return {
        "sentence_good": f"{cap} {good}{rest} .".replace(" .", "."),
        "sentence_bad": f"{cap} {bad}{rest} .".replace(" .", "."),
        "one_prefix_prefix": cap,
        "one_prefix_word_good": good,
        "one_prefix_word_bad": bad,
        "field": field,
        "linguistics_term": term,
        "UID": uid,
        "simple_LM_method": True,
        "one_prefix_method": True,
        "two_prefix_method": False,
        "lexically_identical": False,
        "pairID": str(pair_id),
    }


def minimal_pair(grammar: Grammar, uid: str, pair_id: int) -> dict:
    """One BLiMP-format row for paradigm `uid`; singular and plural subjects alternate by pair id."""
    rng = grammar.rng
    plural = pair_id % 2 == 1
    match uid:
        case "simple_agreement" | "irregular_plural_agreement":
            nouns = IRREGULAR_NOUNS if uid.startswith("irregular") else REGULAR_NOUNS
            subj = _noun(rng, plural, nouns, det="the").text
        case "agreement_across_pp":
            dist = _noun(rng, not plural, det="the")  # distractor of the other number, like BLiMP
            subj = f"{_noun(rng, plural, det='the').text} {rng.choice(PREPOSITIONS)} {dist.text}"
        case "agreement_across_relative_clause":
            dist = _noun(rng, not plural, det="the")
            verb = _verb(rng.choice(TRANSITIVE), dist.plural)
            subj = f"{_noun(rng, plural, det='the').text} that {dist.text} {verb}"
        case "determiner_noun_agreement":
            sg, pl = rng.choice(OBJECTS)
            det = rng.choice(["these", "those"] if plural else ["this", "that"])
            prefix = f"{_noun(rng, _pick_plural(rng)).text} {rng.choice(['saw', 'liked'])} {det}"
            good, bad = (pl, sg) if plural else (sg, pl)
            return _blimp_row(uid, pair_id, prefix, good, bad, "")
        case "anaphor_number_agreement":
            head = _noun(rng, plural, det="the")
            sg_refl = rng.choice(NOUNS)[2] if plural else head.reflexive
            good, bad = ("themselves", sg_refl) if plural else (head.reflexive, "themselves")
            prefix = f"{head.text} {rng.choice(REFLEXIVE_VERBS)}"
            return _blimp_row(uid, pair_id, prefix, good, bad, "")
        case other:
            raise ValueError(f"unknown paradigm {other!r}; known: {sorted(PARADIGMS)}")
    pair = rng.choice(INTRANSITIVE)
    good, bad = (pair[1], pair[0]) if plural else pair
    rest = f" {rng.choice(ADJECTIVES)}" if pair in INTRANSITIVE[:2] else f" {rng.choice(FILLERS)}"
    return _blimp_row(uid, pair_id, subj, good, bad, rest)


def answer_words() -> set[str]:
    """Every word that can be an answer of a toy task (each must be a single token)."""
    words = {w for sg, pl, _ in NOUNS for w in (sg, pl)}
    words |= {w for pair in INTRANSITIVE for w in pair}
    words |= {w for pair in OBJECTS for w in pair}
    words |= {refl for _, _, refl in NOUNS} | {"themselves"}
    return words
