"""Screening reports as training data: sections, the reference's text cleaning, labels, and label CSVs.

``split_sections`` and ``clean_report_text`` make the training text of a report; ``parse_labels`` reads
breast labels from it (a NegEx-style, sentence-level rule set, not a learned model); ``read_label_csv`` and
``synthesize_breast_report`` make labels and report-style text for archives that have labels but no reports
(VinDr-Mammo, RSNA screening, or a site's own label table).
"""

from __future__ import annotations

import ast
import csv
import random
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from training.label_text import breast_text

SIDES = ("L", "R")
DENSITIES = ("A", "B", "C", "D")
# ACR BI-RADS Atlas: the overall assessment is that of the worse breast, in this order of increasing concern.
BIRADS_HIERARCHY = (1, 2, 3, 6, 0, 4, 5)

# --- sections -------------------------------------------------------------------------------------------

_HEADING_NAMES = (r"(?:overall\s+|final\s+)?(?:findings?|impressions?|assessments?|conclusions?)|recommendations?"
                  r"|(?:clinical\s+)?(?:history|indications?)|techniques?|comparisons?|exam(?:ination)?")
HEADING = re.compile(rf"(?im)^[ \t]*(?P<line>{_HEADING_NAMES})[ \t]*:?[ \t]*$|(?<![\w-])(?P<colon>{_HEADING_NAMES})"
                     r"[ \t]*:")
SECTION_OF = {"finding": "findings", "impression": "impression", "assessment": "impression",
              "conclusion": "impression"}


@dataclass(frozen=True)
class ReportSections:
    """A report's findings, impression (with assessment and conclusion) and everything else."""

    findings: str
    impression: str
    other: str


def _section_field(heading: str) -> str:
    last_word = heading.lower().split()[-1]
    return SECTION_OF.get(last_word.removesuffix("s"), "other")


def split_sections(text: str) -> ReportSections:
    """Split at headings (case-insensitive; on a line of their own, or followed by a colon). Text before the
    first heading is ``other`` when there is a FINDINGS heading, else it is the findings (a narrative report,
    perhaps with an IMPRESSION after it)."""
    matches = list(HEADING.finditer(text))
    fields = [_section_field(match.group("line") or match.group("colon")) for match in matches]
    untitled = text[:matches[0].start()] if matches else text
    parts: dict[str, list[str]] = {"findings": [], "impression": [], "other": []}
    parts["other" if "findings" in fields else "findings"].append(untitled)
    starts = [match.start() for match in matches] + [len(text)]
    for match, name, end in zip(matches, fields, starts[1:], strict=True):
        parts[name].append(text[match.end():end])
    joined = {name: "\n".join(p.strip() for p in bodies if p.strip()) for name, bodies in parts.items()}
    return ReportSections(**joined)


# --- the reference's cleaning ---------------------------------------------------------------------------

PLACEHOLDER = re.compile(r"\[\*\*.*?\*\*\]|_{2,}|\bX{3,}\b")  # MIMIC "[**...**]" and "___", IU X-ray "XXXX"
BIRADS_WORD = re.compile(r"\bbi[\s-]?rads\b", re.IGNORECASE)
PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")  # a period, unless it is a decimal point
WORDPUNCT = re.compile(r"\d+(?:\.\d+)+|\w+|[^\w\s]+")  # nltk.wordpunct_tokenize, keeping decimals


def _clean_sentence(sentence: str) -> str:
    tokens = (token.encode("ascii", "ignore").decode("ascii") for token in WORDPUNCT.findall(sentence.lower()))
    kept = [token for token in tokens if token]
    return " ".join(kept) if len(kept) > 2 else ""


def clean_report_text(text: str) -> str:
    """Training text as the reference makes it (Mammo-CLIP ``src/codebase/augment_text.py``,
    ``_split_report_into_segment_concat``, with ``process_df``'s "BI-RADS" -> "BIRADS"): newlines become
    spaces, the text is split into sentences at periods, each sentence is lower-cased and tokenized like
    ``nltk.wordpunct_tokenize`` (words and punctuation runs, joined by single spaces), non-ASCII characters
    are dropped from the tokens, sentences of fewer than three tokens are dropped, and the sentences are
    concatenated without their periods (the reference's ``*_wo_period`` data).

    Beyond the reference: NFKD normalization first (full-width letters, ligatures, and accented letters keep
    their base letter: "café" is "cafe", not "caf"), U+FFFD replacement characters as spaces (the reference
    replaces pairs of them), de-identification placeholders and section headings removed, "bi-rads"/"bi rads"
    in any case, and decimals kept whole ("1.5 cm", where the reference splits a sentence at the point).
    """
    text = unicodedata.normalize("NFKD", text).replace("\ufffd", " ")
    text = HEADING.sub(". ", PLACEHOLDER.sub(" ", text))
    text = BIRADS_WORD.sub("birads", text).replace("\n", " ")
    sentences = (_clean_sentence(sentence) for sentence in PERIOD.split(text))
    return " ".join(sentence for sentence in sentences if sentence)


def training_texts(report: str) -> list[str]:
    """The cleaned FINDINGS and IMPRESSION, without empty or repeated ones: the reference's per-breast
    ``text`` list, from which each training step draws."""
    sections = split_sections(report)
    texts = [clean_report_text(sections.findings), clean_report_text(sections.impression)]
    return list(dict.fromkeys(text for text in texts if text))


# --- labels from report text ----------------------------------------------------------------------------

SENTENCE_BREAK = re.compile(r"(?<!\d)\.|\.(?!\d)|!|\n[ \t]*\n|\n(?=[ \t]*[A-Z0-9*•-])")
CLAUSE_BREAK = re.compile(r";|\b(?:but|however|except|although|though|whereas|while|aside from|apart from"
                          r"|other than)\b", re.IGNORECASE)
PSEUDO_NEGATION = re.compile(
    r"\bno (?:significant |substantial )?(?:interval )?(?:change|increase|growth)\b|\bnot only\b"
    r"|\bwithout (?:significant |interval )?change\b|\bnot (?:previously )?(?:seen|present|visible|visualized|"
    r"identified) (?:on|in) (?:the )?(?:prior|previous|comparison)\w*|\bnot previously\b", re.IGNORECASE)
PRE_NEGATION = re.compile(r"\b(?:no|not|without|negative for|free of|absence of|neither|nor|resolved|resolution of)\b",
                          re.IGNORECASE)
NEGATION_WINDOW = 5  # words from a pre-negation trigger to the finding it negates (NegEx's window)
NEGATION_END = re.compile(r"\b(?:within|in the setting of|secondary to|adjacent to|which|who|whose)\b", re.IGNORECASE)
# Between the terms of a coordinated list ("masses, calcifications or distortion", "mass with associated
# calcifications"): a connector, then up to three words that are not a verb, each time.
LIST_GAP = re.compile(r"(?:\s*+(?:,|/|\b(?:and/or|or|and|nor|with)\b)\s*+"
                      r"(?:(?!(?:is|are|was|were|there|which|that)\b)\w[\w-]*+\s*+){0,3})++", re.IGNORECASE)
POST_NEGATION = re.compile(
    r"\bnot (?:be )?(?:seen|identified|visualized|visible|present|appreciated|demonstrated|evident|detected"
    r"|suspicious)\b|\b(?:has|have)? ?resolved\b|\b(?:is|are) absent\b|\bno longer\b", re.IGNORECASE)
UNCERTAIN = re.compile(r"\?|\b(?:possible|possibly|questionable|equivocal|may represent|could represent|versus|vs"
                       r"|cannot (?:be )?(?:excluded|exclude|ruled out|rule out)|can not be|not (?:be )?excluded)\b",
                       re.IGNORECASE)
NOT_THIS_EXAM = re.compile(r"\b(?:obscur\w*|sensitivity|rule out|r/o|to exclude|evaluate for|history of"
                           r"|status post|s/p|excision of|excised|removed)\b", re.IGNORECASE)
BENIGN_CALCIFICATION = re.compile(r"\b(?:benign|vascular|dermal|skin|secretory|milk of calcium|coarse|popcorn|rim"
                                  r"|eggshell|dystrophic|rod-like|lucent)", re.IGNORECASE)
FINDING_TERMS = {"mass": re.compile(r"\bmass(?:es)?\b", re.IGNORECASE),
                 "calcification": re.compile(r"\b(?:micro-?)?calcifications?\b|\b(?:micro)?calcs?\b", re.IGNORECASE)}
# A side word; "both" also for two sides coordinated ("in the left and in the right breast"), unless the second
# one starts a clause of its own ("... in the left breast and the right breast is normal").
SIDE_WORD = re.compile(r"\b(?:(?i:(?P<both>bilateral(?:ly)?|both breasts"
                       r"|(?:left|right)(?:\s+breast)?\s+(?:and|or|as well as|&)\s+(?:in\s+)?(?:the\s+)?(?:left|right)"
                       r"(?!(?:\s+breasts?)?\s+(?:is|are|was|were|appears?|remains?|shows?|demonstrates?|has|have"
                       r"|contains?)\b))"
                       r"|(?P<left>left)|(?P<right>right))|(?P<letter>[LR]))\b(?i:\s+breasts?\b)?")
PART_BREAK = re.compile(r",|\band\b", re.IGNORECASE)  # never inside a side word ("left and right", _clauses)
NORMAL = re.compile(r"\b(?:is|are|appears?|remains?)\s+(?:mammographically\s+)?(?:normal|negative|unremarkable)\b"
                    r"|:\s*(?:normal|negative|unremarkable)\b|\b(?:normal|negative|unremarkable)(?=\s+(?:left|right)\b)"
                    r"|\bno (?:suspicious |significant |mammographic )?(?:findings?|abnormalit(?:y|ies)"
                    r"|evidence of malignancy)\b", re.IGNORECASE)
SIDE_HEADING = re.compile(r"^\W*(?i:left|right|bilateral)(?i:\s+breast)?\s*:")
BIRADS_VALUE = re.compile(r"(?i:\b(?P<word>bi[\s-]?rads\b\W{0,3}(?:(?:assessment|category|cat)\b\W{0,3}){0,2}"
                          r"|category\W{0,3}))(?P<value>[0-6])(?i:[abc])?\b")
DENSITY_WORDS = re.compile(r"densit|composition|fibroglandular|fatty|dense", re.IGNORECASE)
DENSITY_LETTER = re.compile(r"(?i:\b(?:acr|density|composition|category|type))\s*(?i:category|type|class)?\s*[:-]?"
                            r"\s*\(?(?P<letter>[A-D])\b(?!-)")
DENSITY_PHRASES = (("A", re.compile(r"\b(?:almost entirely|predominantly|mostly) fat(?:ty)?\b", re.IGNORECASE)),
                   ("B", re.compile(r"\bscattered (?:areas of )?fibroglandular\b", re.IGNORECASE)),
                   ("C", re.compile(r"\bheterogeneously dense\b", re.IGNORECASE)),
                   ("D", re.compile(r"\bextremely dense\b", re.IGNORECASE)))


@dataclass
class ReportLabels:
    """Labels read from one report. ``None``: the report does not say; sides are "L"/"R". ``normal_sides``: the
    breasts it calls normal, negative or unremarkable ("no suspicious findings in the left breast").
    ``uncertain_sides`` and ``negated_sides``: per finding kind, the breasts an uncertain ("possible mass in the
    right breast") or negated mention is about, both when it names no side."""

    birads: int | None
    birads_by_side: dict[str, int]
    density: str | None
    mass: bool | None
    calcification: bool | None
    mass_sides: set[str]
    calcification_sides: set[str]
    uncertain: list[str]
    normal_sides: set[str]
    uncertain_sides: dict[str, set[str]] = field(default_factory=dict)
    negated_sides: dict[str, set[str]] = field(default_factory=dict)

    def finding_on(self, kind: str, side: str) -> bool | None:
        """Whether breast ``side`` has finding ``kind``: True where affirmed on it; None where a mention on it
        (or on no stated side) is uncertain, or where it is affirmed on no stated side; else False where the
        breast is settled (the report is complete, with BI-RADS; or it affirms the finding on the other breast;
        or it negates the finding on, or calls normal, this one), None where it is not."""
        present: bool | None = getattr(self, kind)
        affirmed_sides: set[str] = getattr(self, f"{kind}_sides")
        if side in affirmed_sides:
            return True
        if side in self.uncertain_sides.get(kind, set()) or (present and not affirmed_sides):
            return None
        settled = self.birads is not None or bool(affirmed_sides) or \
            side in self.normal_sides | self.negated_sides.get(kind, set())
        return False if settled else None


@dataclass
class _Evidence:
    """What a report says about one finding: affirmed sides, and whether it was negated or uncertain."""

    affirmed: bool = False
    sides: set[str] = field(default_factory=set)
    negated: bool = False
    uncertain: bool = False
    negated_sides: set[str] = field(default_factory=set)
    uncertain_sides: set[str] = field(default_factory=set)

    def decide(self, complete: bool) -> bool | None:
        if self.affirmed:
            return True
        if self.uncertain:
            return None
        return False if self.negated or complete else None


def _sides(text: str) -> set[str]:
    sides: set[str] = set()
    for match in SIDE_WORD.finditer(text):
        sides |= _match_sides(match)
    return sides


def _match_sides(match: re.Match[str]) -> set[str]:
    if match.group("both"):
        return set(SIDES)
    if match.group("letter"):
        return {match.group("letter")}
    return {"L"} if match.group("left") else {"R"}


def _sentences(body: str) -> list[tuple[str, set[str]]]:
    """Sentences of a section with the sides of the latest "Left breast:"-style heading before them."""
    context: set[str] = set()
    result = []
    for raw in SENTENCE_BREAK.split(body):
        sentence = " ".join(raw.split())
        if not sentence:
            continue
        heading = SIDE_HEADING.match(sentence)
        if heading:
            context = _sides(heading.group())
        result.append((sentence, context))
    return result


def _spans(pattern: re.Pattern[str], text: str, start: int, end: int,
           within: Iterable[re.Match[str]] = ()) -> list[tuple[int, int]]:
    """The spans of ``text[start:end]`` between the matches of ``pattern`` (none of them inside ``within``)."""
    kept = [(match.start(), match.end()) for match in within]
    cuts = [cut for cut in pattern.finditer(text, start, end)
            if not any(first <= cut.start() and cut.end() <= last for first, last in kept)]
    return list(zip([start] + [cut.end() for cut in cuts], [cut.start() for cut in cuts] + [end], strict=True))


def _clauses(sentence: str) -> list[tuple[int, int]]:
    """Spans of a sentence's clauses: split at ``CLAUSE_BREAK``, then at commas and "and" between parts that each
    name a side ("a mass in the left breast, and the right breast is normal"). A part that names no side stays
    with the part before it, or, before the first side, with the part that names it ("a mass, 1 cm, in the left
    breast")."""
    clauses: list[tuple[int, int]] = []
    for clause_start, clause_end in _spans(CLAUSE_BREAK, sentence, 0, len(sentence)):
        first, sided = len(clauses), False
        sides = list(SIDE_WORD.finditer(sentence, clause_start, clause_end))
        for start, end in _spans(PART_BREAK, sentence, clause_start, clause_end, sides):
            names = SIDE_WORD.search(sentence, start, end) is not None
            if len(clauses) > first and not (names and sided):
                clauses[-1] = (clauses[-1][0], end)
                sided = sided or names
            else:
                clauses.append((start, end))
                sided = names
    return clauses


def _nearest_side(text: str, span: tuple[int, int], bounds: tuple[int, int]) -> set[str]:
    """The sides of the side word in ``text[bounds]`` nearest to ``text[span]`` (in characters; the earlier
    one on a tie); empty when there is none."""
    nearest = min(SIDE_WORD.finditer(text, *bounds), default=None,
                  key=lambda word: span[0] - word.end() if word.end() <= span[0] else word.start() - span[1])
    return _match_sides(nearest) if nearest else set()


def _side(sentence: str, clause: tuple[int, int], span: tuple[int, int], context: set[str]) -> set[str]:
    """The sides ``sentence[span]`` is about: the nearest side named in its clause, else in its sentence, else
    the heading's (``_sentences``). One side, so "left breast mass and right breast calcifications" gives each
    finding its own; both only for a word that names both ("bilateral", "left and right")."""
    return _nearest_side(sentence, span, clause) or _nearest_side(sentence, span, (0, len(sentence))) or context


def _coordinated(sentence: str, clause: tuple[int, int]) -> list[list[tuple[re.Match[str], str]]]:
    """The finding terms of a clause, with their kinds, in coordinated lists ("masses, calcifications or
    distortion" is one list of two; "calcifications are seen within the mass" two lists of one)."""
    found = sorted(((match, kind) for kind, term in FINDING_TERMS.items()
                    for match in term.finditer(sentence, *clause)), key=lambda item: item[0].start())
    lists: list[list[tuple[re.Match[str], str]]] = []
    for match, kind in found:
        if lists and LIST_GAP.fullmatch(sentence, lists[-1][-1][0].end(), match.start()):
            lists[-1].append((match, kind))
        else:
            lists.append([(match, kind)])
    return lists


def _negated(before: str, after: str) -> bool:
    """Whether a list of finding terms is negated: by the last pre-negation trigger in ``before`` (the text
    back to the previous finding term) at most ``NEGATION_WINDOW`` words before it with no ``NEGATION_END``
    word between, or by a post-negation in ``after`` (up to the next finding term): "no calcifications are seen
    within the mass" negates the calcifications only."""
    triggers = list(PRE_NEGATION.finditer(before))
    scope = before[triggers[-1].end():] if triggers else None
    if scope is not None and len(scope.split()) <= NEGATION_WINDOW and not NEGATION_END.search(scope):
        return True
    return POST_NEGATION.search(after) is not None


def _mention_status(clause: str, before: str, after: str, kind: str, negated: bool) -> str | None:
    """"affirmed", "negated", "uncertain", or None for a mention that is not about this examination
    ("may obscure small masses", "history of", "excised"). ``before``/``after``: the clause's text around it."""
    if NOT_THIS_EXAM.search(clause):
        return None
    if UNCERTAIN.search(clause):
        return "uncertain"
    if negated:
        return "negated"
    if kind == "calcification":
        window = " ".join(before.split()[-5:] + after.split()[:10])
        if BENIGN_CALCIFICATION.search(window):
            return "negated"  # benign calcifications are no suspicious calcifications
    return "affirmed"


def _read_findings(sentence: str, context: set[str], evidence: dict[str, _Evidence], normal: set[str]) -> bool:
    """Add the sentence's finding mentions to ``evidence`` and the sides it calls normal to ``normal``; True
    when a mention was uncertain."""
    masked = PSEUDO_NEGATION.sub(lambda m: " " * len(m.group()), sentence)
    uncertain = False
    for clause in _clauses(masked):
        text = masked[clause[0]:clause[1]]
        lists = _coordinated(masked, clause)
        for index, terms in enumerate(lists):
            previous_end = lists[index - 1][-1][0].end() if index else clause[0]
            next_start = lists[index + 1][0][0].start() if index + 1 < len(lists) else clause[1]
            negated = _negated(masked[previous_end:terms[0][0].start()], masked[terms[-1][0].end():next_start])
            for match, kind in terms:
                status = _mention_status(text, masked[clause[0]:match.start()], masked[match.end():clause[1]], kind,
                                         negated)
                sides = _side(masked, clause, match.span(), context)
                if status == "affirmed":
                    evidence[kind].affirmed = True
                    evidence[kind].sides |= sides
                elif status == "negated":
                    evidence[kind].negated = True
                    evidence[kind].negated_sides |= sides or set(SIDES)
                elif status == "uncertain":
                    evidence[kind].uncertain = uncertain = True
                    evidence[kind].uncertain_sides |= sides or set(SIDES)
        for match in NORMAL.finditer(text):
            normal |= _side(masked, clause, (clause[0] + match.start(), clause[0] + match.end()), context)
    return uncertain


def birads_rank(value: int) -> int:
    """Position of a BI-RADS category in the ACR hierarchy (``BIRADS_HIERARCHY``): higher is more severe."""
    return BIRADS_HIERARCHY.index(value)


def _read_birads(sentence: str) -> list[tuple[int, set[str]]]:
    """(category, sides) stated in a sentence. A side word attaches to the following category when the
    sentence names a side first ("Right: BI-RADS 4, left: BI-RADS 2"), else to the preceding one
    ("BI-RADS 4 right, BI-RADS 2 left"); a category with no side is the overall one (empty set)."""
    mentions = [m for m in BIRADS_VALUE.finditer(sentence)
                if m.group("word").lower().startswith("bi") or not DENSITY_WORDS.search(sentence)]
    if not mentions:
        return []
    side_words = list(SIDE_WORD.finditer(sentence))
    assigned: list[set[str]] = [set() for _ in mentions]
    side_first = bool(side_words) and side_words[0].start() < mentions[0].start()
    for word in side_words:
        if side_first:
            index = next((i for i, m in enumerate(mentions) if m.start() > word.start()), len(mentions) - 1)
        else:
            index = max((i for i, m in enumerate(mentions) if m.end() <= word.start()), default=0)
        assigned[index] |= _match_sides(word)
    return [(int(m.group("value")), sides) for m, sides in zip(mentions, assigned, strict=True)]


def _read_density(sentence: str) -> list[str]:
    found = [match.group("letter") for match in DENSITY_LETTER.finditer(sentence)]
    return found + [letter for letter, phrase in DENSITY_PHRASES if phrase.search(sentence)]


def parse_labels(text: str) -> ReportLabels:
    """Labels from the FINDINGS and IMPRESSION of a report (``split_sections``: untitled text counts as
    findings when there is no FINDINGS heading); history, indication, comparison and the rest are ignored:
    "6-month follow-up of a BI-RADS 3 mass" is not this examination's finding.

    A finding is True when affirmed anywhere (positive precedence), None when any mention of it is
    uncertain ("possible mass"), False when negated or, in a report with a BI-RADS assessment (a complete
    report), not mentioned. Negation is NegEx-style: a trigger ("no", "without", "negative for", "free of",
    ...) negates the finding term after it, within five words and not past "within", "which"..., and the
    terms coordinated with it ("no suspicious mass or calcifications"), not a later one ("no calcifications
    are seen within the mass"); a post-negation ("is not seen", "has resolved") the terms just before it.
    Clauses end at ";", "but", "however", "except" and similar, and at a comma or "and" between parts that each
    name a side. A finding is on the side named nearest to it in its clause (``_side``). Benign-appearing,
    vascular, coarse... calcifications do not count as suspicious ones. BI-RADS is the most severe category stated,
    overall or per breast, in the ACR hierarchy 1 < 2 < 3 < 6 < 0 < 4 < 5; density is the densest stated.
    """
    sections = split_sections(text)
    evidence = {kind: _Evidence() for kind in FINDING_TERMS}
    birads: list[tuple[int, set[str]]] = []
    densities: list[str] = []
    uncertain: list[str] = []
    normal: set[str] = set()
    for body in (sections.findings, sections.impression):
        for sentence, context in _sentences(body):
            if _read_findings(sentence, context, evidence, normal) and sentence not in uncertain:
                uncertain.append(sentence)
            birads += _read_birads(sentence)
            densities += _read_density(sentence)
    by_side: dict[str, int] = {}
    for value, sides in birads:
        for side in sides:
            by_side[side] = max(by_side.get(side, value), value, key=birads_rank)
    overall = max((value for value, _ in birads), key=birads_rank, default=None)
    complete = overall is not None
    return ReportLabels(
        birads=overall, birads_by_side=by_side, density=max(densities, default=None),
        mass=evidence["mass"].decide(complete), calcification=evidence["calcification"].decide(complete),
        mass_sides=evidence["mass"].sides, calcification_sides=evidence["calcification"].sides, uncertain=uncertain,
        normal_sides=normal, uncertain_sides={kind: found.uncertain_sides for kind, found in evidence.items()},
        negated_sides={kind: found.negated_sides for kind, found in evidence.items()})


# --- label CSVs -----------------------------------------------------------------------------------------

VINDR_COLUMNS = ("study_id", "image_id", "laterality", "breast_birads", "breast_density")
RSNA_COLUMNS = ("patient_id", "image_id", "laterality", "cancer")
# RSNA's BIRADS column -> ACR: 0 "required follow-up" is a recall (ACR 0); 1 "negative for cancer" and 2 "normal"
# both call the breast negative (ACR 1): RSNA's 2 is not ACR's "benign"
RSNA_BIRADS = {0: 0, 1: 1, 2: 1}
GENERIC_KEYS = ("study_instance_uid", "accession_number")
GENERIC_LABELS = ("mass", "calcification", "malignant", "density", "birads")
LATERALITY = {"l": "L", "left": "L", "r": "R", "right": "R"}
FLAG_VALUES = {"1": True, "1.0": True, "true": True, "yes": True, "y": True,
               "0": False, "0.0": False, "false": False, "no": False, "n": False}


def _merge_flag(old: bool | None, new: bool | None) -> bool | None:
    return new if old is None else old or bool(new)


@dataclass
class BreastLabels:
    """Labels of one breast of one study; ``None`` is unknown.

    ``study``: VinDr's ``study_id``, RSNA's ``patient_id``, or the generic layout's ``study_instance_uid``
    ("" when a row has only an ``accession_number``, which is kept in ``accession_number``).
    ``malignant``: RSNA's ``cancer`` (biopsy-proven). For VinDr-Mammo it is a proxy, because VinDr has no
    pathology: BI-RADS 5 malignant, 1-3 not, 4 (2-95% likely malignant) unknown. RSNA's ``BIRADS`` is not the ACR
    scale (0: follow-up needed, 1: negative for cancer, 2: normal): read as ACR 0 and 1 (``RSNA_BIRADS``).
    ``mass``/``calcification``: VinDr's ``finding_categories`` ("Mass",
    "Suspicious Calcification"); unknown for RSNA and for VinDr's breast-level file, which has no findings.
    The generic layout has columns of these names (0/1, also true/false, yes/no).
    """

    study: str
    laterality: str
    image_ids: list[str] = field(default_factory=list)
    mass: bool | None = None
    calcification: bool | None = None
    malignant: bool | None = None
    density: str | None = None
    birads: int | None = None
    accession_number: str | None = None

    def merge(self, other: BreastLabels) -> None:
        """Add the labels of another row (or breast): a finding counts when either has it, BI-RADS is the
        more severe (ACR hierarchy), density the first known."""
        self.image_ids += [image_id for image_id in other.image_ids if image_id not in self.image_ids]
        self.mass = _merge_flag(self.mass, other.mass)
        self.calcification = _merge_flag(self.calcification, other.calcification)
        self.malignant = _merge_flag(self.malignant, other.malignant)
        if other.birads is not None:
            self.birads = other.birads if self.birads is None else max(self.birads, other.birads, key=birads_rank)
        self.density = self.density or other.density


def _columns(path: Path, fieldnames: Iterable[str]) -> tuple[str, dict[str, str]]:
    """The layout ("vindr", "rsna" or "generic") and a map from lower-case column name to the file's name."""
    columns = {name.strip().lower(): name for name in fieldnames}
    if all(name in columns for name in VINDR_COLUMNS):
        return "vindr", columns
    if all(name in columns for name in RSNA_COLUMNS):
        return "rsna", columns
    if "laterality" in columns and any(key in columns for key in GENERIC_KEYS) and any(
            name in columns for name in GENERIC_LABELS):
        return "generic", columns
    raise ValueError(
        f"{path}: unknown label CSV layout; expected VinDr-Mammo columns {', '.join(VINDR_COLUMNS)} "
        f"(optionally finding_categories, from finding_annotations.csv), RSNA columns "
        f"{', '.join(RSNA_COLUMNS)} (optionally density, BIRADS), or {' or '.join(GENERIC_KEYS)}, laterality "
        f"and any of {', '.join(GENERIC_LABELS)}; found {', '.join(columns) or 'no header'}")


def _birads_or_none(text: str) -> int | None:
    match = re.search(r"\d+(?:\.0*)?", text)
    value = int(float(match.group())) if match else None
    return value if value in BIRADS_HIERARCHY else None


def _flag_or_none(text: str) -> bool | None:
    return FLAG_VALUES.get(text.strip().lower())


def _density_or_none(text: str) -> str | None:
    match = re.search(r"\b([A-D])\s*$", text.strip().upper())
    return match.group(1) if match else None


def _categories(text: str, where: str) -> set[str]:
    if not text.strip():
        return set()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as error:
        raise ValueError(f"{where}: finding_categories is not a list: {text!r}") from error
    return {str(item).strip().lower() for item in ([value] if isinstance(value, str) else value)}


def _row_labels(row: Mapping[str, str], layout: str, side: str, where: str) -> BreastLabels:
    """The labels one row states."""
    key = {"vindr": "study_id", "rsna": "patient_id"}.get(layout, "study_instance_uid")
    image_id = row.get("image_id", "").strip()
    labels = BreastLabels(row.get(key, "").strip(), side, [image_id] if image_id else [],
                          accession_number=row.get("accession_number", "").strip() or None)
    if layout == "vindr":
        labels.birads = _birads_or_none(row["breast_birads"])
        labels.density = _density_or_none(row["breast_density"])
        labels.malignant = None if labels.birads in (None, 4) else labels.birads >= 5
        if "finding_categories" in row:
            found = _categories(row["finding_categories"], where)
            labels.mass, labels.calcification = "mass" in found, "suspicious calcification" in found
        return labels
    labels.birads = _birads_or_none(row.get("birads", ""))
    if layout == "rsna" and labels.birads is not None:
        labels.birads = RSNA_BIRADS.get(labels.birads)
    labels.density = _density_or_none(row.get("density", ""))
    labels.mass, labels.calcification = _flag_or_none(row.get("mass", "")), _flag_or_none(row.get("calcification", ""))
    labels.malignant = _flag_or_none(row.get("cancer" if layout == "rsna" else "malignant", ""))
    return labels


def read_label_csv(path: str | Path) -> list[BreastLabels]:
    """Breast labels from a VinDr-Mammo (``breast-level_annotations.csv`` or ``finding_annotations.csv``),
    RSNA screening (``train.csv``) or generic file (``study_instance_uid`` and/or ``accession_number``,
    ``laterality``, any of mass, calcification, malignant (0/1), density (A-D), birads), rows (per image, per
    finding or per breast) grouped by (study, laterality): VinDr's ``study_id``, RSNA's ``patient_id`` (one
    screening examination per patient), the generic keys. Column names are matched case-insensitively; an
    unknown layout is a ValueError naming the columns expected."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        layout, columns = _columns(path, reader.fieldnames or [])
        breasts: dict[tuple[str, str | None, str], BreastLabels] = {}
        for raw in reader:
            row = {name: (raw[original] or "") for name, original in columns.items()}
            side = LATERALITY.get(row["laterality"].strip().lower())
            if side is None:
                raise ValueError(f"{path}, line {reader.line_num}: laterality {row['laterality']!r} is not L or R")
            labels = _row_labels(row, layout, side, f"{path}, line {reader.line_num}")
            key = (labels.study, labels.accession_number, side)
            breasts.setdefault(key, BreastLabels(labels.study, side, accession_number=labels.accession_number))
            breasts[key].merge(labels)
    return list(breasts.values())


def synthesize_breast_report(labels: BreastLabels, rng: random.Random) -> str | None:
    """Report-style text for a breast (``training.label_text.breast_text``), or None when a label it would
    state is unknown: mass, calcification, malignant, density (A-D) or BI-RADS (0-5). ``breast_text`` has
    no way to leave a label out, and a default would put a made-up finding or density into the training
    text (the rule ``training.datasets.breast_labels`` follows too); RSNA rows, which have no findings,
    therefore give None."""
    values = {"mass": labels.mass, "calcification": labels.calcification, "malignant": labels.malignant}
    if (any(value is None for value in values.values()) or labels.density not in DENSITIES
            or labels.birads not in range(6)):
        return None
    mapping = {name: int(bool(value)) for name, value in values.items()}
    return breast_text({**mapping, "density": labels.density, "birads": labels.birads}, labels.laterality, rng)
