"""Talk of Norway (``ton:PATH/ton.csv``): Norwegian parliament speeches, one task per speaker.

The corpus is not shipped (download ``ton.csv`` yourself). Two speaker selections:

* ``paper``: the first ``num_speakers`` speakers (by the date of their first speech) with more than
  100 speeches, as in the BoRA paper;
* ``reference``: speakers with 200 < n < 1000 speeches, in name order (the paper's reference code).

Cleaning drops empty speeches and speeches shorter than ``min_words`` words before counting.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

TON_SELECTIONS = ("paper", "reference")
_REQUIRED = ("rep_name", "text")


def read_ton(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Talk of Norway file not found: {str(path)!r} (download ton.csv and pass ton:PATH)")
    try:
        frame = pd.read_csv(path, low_memory=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        reason = " ".join(str(err).split())[:300]
        raise ValueError(f"{path}: not a readable Talk of Norway CSV file (UTF-8, comma-separated): {reason}") from None
    missing = [c for c in _REQUIRED if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{path}: missing Talk of Norway column(s) {missing}; columns present: {list(frame.columns)[:20]}"
        )
    return frame


def clean_speeches(frame: pd.DataFrame, min_words: int) -> pd.DataFrame:
    """Drop rows without a speaker, empty speeches and speeches under ``min_words`` words; sort by date."""
    text = frame["text"].fillna("").astype(str).str.strip()
    speaker = frame["rep_name"].fillna("").astype(str).str.strip()
    keep = (speaker != "") & (text.str.split().str.len() >= min_words)
    if (~keep).any():
        log.warning(
            "Talk of Norway: dropped %d speech(es) that are empty, anonymous or under %d words",
            int((~keep).sum()),
            min_words,
        )
    out = frame.assign(text=text, rep_name=speaker)[keep]
    time_columns = [c for c in ("date", "time") if c in out.columns]
    if time_columns:
        out = out.assign(_when=pd.to_datetime(out[time_columns[0]], errors="coerce"))
        out = out.sort_values("_when", kind="stable", na_position="last").drop(columns="_when")
    return out


def select_speakers(speeches: pd.DataFrame, selection: str, num_speakers: int) -> list[str]:
    """Speaker names under the chosen selection rule (see the module docstring)."""
    counts = speeches.groupby("rep_name", sort=False).size()  # in order of first speech
    if selection == "paper":
        chosen = [name for name, n in counts.items() if n > 100]
    elif selection == "reference":
        chosen = sorted(name for name, n in counts.items() if 200 < n < 1000)
    else:
        raise ValueError(f"Talk of Norway selection must be one of {TON_SELECTIONS}, got {selection!r}")
    if not chosen:
        raise ValueError(
            f"no Talk of Norway speaker satisfies the {selection!r} selection rule "
            f"(largest speech counts: {counts.sort_values(ascending=False).head(3).to_dict()})"
        )
    return chosen[:num_speakers]


def ton_documents(
    path: str | Path, selection: str = "paper", num_speakers: int = 25, min_words: int = 10
) -> dict[str, list[str]]:
    """Speeches per selected speaker, in date order: {speaker: [speech, ...]}."""
    speeches = clean_speeches(read_ton(path), min_words)
    speakers = select_speakers(speeches, selection, num_speakers)
    grouped = speeches[speeches.rep_name.isin(speakers)].groupby("rep_name", sort=False)["text"]
    by_speaker = {name: list(texts) for name, texts in grouped}
    return {name: by_speaker[name] for name in speakers}
