"""The Talk of Norway loader on a synthetic CSV in the real schema (the corpus is not shipped)."""

from __future__ import annotations

import pandas as pd
import pytest

import bora_pyro
from bora_pyro.data.talk_of_norway import ton_documents

SPEECH = "Takk for ordet president dette er en tale om budsjettet og skolen i hele landet vaart"


def write_ton(path, counts: dict[str, tuple[int, str]]) -> None:
    """counts: speaker -> (number of speeches, date of the first speech)."""
    rows = []
    for name, (n, first) in counts.items():
        for i in range(n):
            date = (pd.Timestamp(first) + pd.Timedelta(days=i)).strftime("%Y-%m-%d")
            rows.append(
                {
                    "id": f"{name}-{i}",
                    "rep_name": name,
                    "party_name": "Partiet",
                    "date": date,
                    "text": f"{SPEECH} nummer {i} fra {name}",
                }
            )
    rows.append({"id": "x", "rep_name": "Kort Taler", "party_name": "P", "date": "1999-01-01", "text": "Kort."})
    pd.DataFrame(rows).sample(frac=1.0, random_state=0).to_csv(path, index=False)


@pytest.fixture
def ton_csv(tmp_path):
    path = tmp_path / "ton.csv"
    write_ton(
        path,
        {
            "Bergersen, Ola": (150, "2001-05-01"),  # > 100, second to start speaking
            "Aas, Kari": (250, "2003-01-01"),  # > 100 and 200 < n < 1000; third
            "Dahl, Per": (120, "1998-03-01"),  # > 100; first to speak
            "Eng, Liv": (90, "1997-01-01"),  # too few for both rules
            "Berg, Anne": (210, "2005-01-01"),  # 200 < n < 1000
        },
    )
    return path


def test_paper_selection_takes_the_first_speakers_with_over_100_speeches(ton_csv):
    docs = ton_documents(ton_csv, selection="paper", num_speakers=3)
    assert list(docs) == ["Dahl, Per", "Bergersen, Ola", "Aas, Kari"]
    assert [len(v) for v in docs.values()] == [120, 150, 250]
    assert docs["Dahl, Per"][0].endswith("nummer 0 fra Dahl, Per")  # in date order


def test_reference_selection_is_200_to_1000_speeches_in_name_order(ton_csv):
    assert list(ton_documents(ton_csv, selection="reference", num_speakers=25)) == ["Aas, Kari", "Berg, Anne"]


def test_short_speeches_are_cleaned_before_counting(tmp_path, caplog):
    path = tmp_path / "ton.csv"
    write_ton(path, {"A, B": (101, "2000-01-01")})
    frame = pd.read_csv(path)
    frame.loc[frame.index[:3], "text"] = "  "  # blank a few speeches: fewer than 101 remain
    frame.to_csv(path, index=False)
    with pytest.raises(ValueError, match="no Talk of Norway speaker satisfies the 'paper' selection"):
        ton_documents(path)
    assert "dropped" in caplog.text


def test_ton_corpus_through_load_corpus(ton_csv, tiny_lm):
    corpus = bora_pyro.load_corpus(
        f"ton:{ton_csv}", tiny_lm[1], num_tasks=2, max_tokens=32, long_documents="truncate"
    )  # one document per speech
    assert corpus.tasks == ("Dahl, Per", "Bergersen, Ola")
    assert corpus.train.docs_per_task().tolist() == [96, 120]


def test_missing_ton_columns_are_named(tmp_path, tiny_lm):
    path = tmp_path / "ton.csv"
    pd.DataFrame({"speaker": ["a"], "text": ["b"]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"missing Talk of Norway column\(s\) \['rep_name'\]"):
        bora_pyro.load_corpus(f"ton:{path}", tiny_lm[1])
