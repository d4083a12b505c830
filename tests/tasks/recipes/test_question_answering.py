"""Extractive question answering in bulk: the removed pipeline's answers, through the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.helpers import tiny_qa


def squad_rows(data_dir: Path) -> pa.Table:
    """SQuAD dev questions: the first 36, plus the first question on each of the 10 contexts of over 500
    tokens (cut into several overlapping windows); columns `id`, `q`, `c`."""
    squad = pq.read_table(data_dir / "squad" / "dev.parquet")
    rows = list(range(36)) + [4142, 4180, 4203, 4260, 4265, 4279, 4297, 4301, 4850, 6373]
    table = squad.take(rows)
    return pa.table({"id": table.column("id"), "q": table.column("question"), "c": table.column("context")})


# transformers 5 removed `pipeline("question-answering")`: these are the outputs of transformers 4.57.1's
# pipeline (default arguments, question=/context= lists) on `squad_rows` with the `tiny_qa` weights,
# as (answer, start, end, score). Rows 36..45 have contexts of 500+ tokens: answers from later windows.
QA_PIPELINE_4_57_1 = [
    ('initiatives, as well as temporarily suspending the tradition', 533, 593, 0.006315475329756737),
    ('initiatives, as well as temporarily suspending the tradition', 533, 593, 0.006243697367608547),
    ('initiatives, as well as temporarily suspending the tradition of naming each', 533, 608, 0.005133387167006731),
    ('initiatives, as well as temporarily suspending the tradition of naming each', 533, 608, 0.0049485680647194386),
    ('initiatives, as well as temporarily suspending', 533, 579, 0.023775406181812286),
    ('initiatives, as well as temporarily suspending the tradition of naming', 533, 603, 0.0024712998420000076),
    ('initiatives, as well as temporarily suspending the tradition of naming each', 533, 608, 0.00505983829498291),
    ('with Roman numerals (under which', 625, 657, 0.012511943466961384),
    ('initiatives, as well as temporarily suspending the tradition of naming', 533, 603, 0.0024712998420000076),
    ('National Football Conference (NFC', 205, 238, 0.04482664167881012),
    ('initiatives, as well as temporarily suspending the tradition of naming', 533, 603, 0.0024769678711891174),
    ('National Football Conference (NFC', 205, 238, 0.044167958199977875),
    ('Bowl, the league emphasized the "golden anniversary" with various', 455, 520, 0.007353345863521099),
    ('Bowl, the league emphasized the "golden anniversary" with various', 455, 520, 0.007356928661465645),
    ('Bowl title. The game was played on', 299, 333, 0.03622252121567726),
    ('initiatives, as well as temporarily suspending the tradition', 533, 593, 0.006412023678421974),
    ('initiatives, as well as', 533, 556, 0.4299374520778656),
    ('Bowl, the league emphasized the "golden anniversary" with various', 455, 520, 0.007356928661465645),
    ('Bowl, the league emphasized the "golden anniversary" with various', 455, 520, 0.007376239635050297),
    ('Bowl, the league emphasized the "golden anniversary" with various', 455, 520, 0.007328095380216837),
    ('initiatives, as well as temporarily suspending', 533, 579, 0.1516686975955963),
    ('with Roman numerals (under which', 625, 657, 0.01289424393326044),
    ('with Roman numerals (under which', 625, 657, 0.012568914331495762),
    ('with Roman numerals (under which', 625, 657, 0.012644065544009209),
    ('National Football Conference (NFC', 205, 238, 0.044167958199977875),
    ('initiatives, as well as temporarily suspending the tradition', 533, 593, 0.006453237030655146),
    ('with Roman numerals (under which', 625, 657, 0.013094418682157993),
    ('with Roman numerals (under which', 625, 657, 0.012607844546437263),
    ('initiatives, as well as temporarily suspending the tradition of naming', 533, 603, 0.002543872222304344),
    ('initiatives, as well as temporarily suspending the tradition of naming', 533, 603, 0.0024436793755739927),
    ('the Arizona Cardinals', 148, 169, 0.0073136524297297),
    ('of four teams that have', 572, 595, 0.07218839228153229),
    ('Arizona Cardinals 49–15 in the NFC', 152, 186, 0.01007557101547718),
    ('of four teams that have made eight', 572, 606, 0.1364874541759491),
    ('and Pittsburgh Steelers as one', 541, 571, 0.006940111983567476),
    ('in 1995. The Broncos', 288, 308, 0.16593226790428162),
    ('in member states must be organised', 1765, 1799, 0.06835269182920456),
    ('undertaken unconditionally', 2585, 2611, 0.014989381656050682),
    ('was estopped from enforcing a conflicting', 378, 419, 0.0020865153055638075),
    ('society’,', 2673, 2682, 0.06122877076268196),
    ('Bundesmonopol', 538, 551, 0.20436140894889832),
    ('advantages", although the Court has approved residential qualifying', 2445, 2512, 0.016371935606002808),
    ('were highly divergent. The ban was proportionate as this was an appropriate', 3787, 3862, 0.015180605463683605),
    ('in Centros Ltd v Erhversus-og', 486, 515, 0.06276854127645493),
    ('typically established for each communication session, but it does have', 2333, 2403, 0.1850261738145491),
    ('Muhammad ibn Zakarīya', 131, 152, 0.03626464307308197),
]


def test_question_answering_matches_pipeline(prefect_harness, minilm, data_dir, tmp_path, capsys):
    from hfbatch.flows.cli import main

    model = tiny_qa(minilm, tmp_path / "qa")
    rows = squad_rows(data_dir)
    path, out = tmp_path / "squad.parquet", tmp_path / "out"
    pq.write_table(rows, path, row_group_size=20)
    assert main(["infer", "--model", model, "--task", "question-answering", "--input", str(path),
                 "--output", str(out), "--columns", "question=q,context=c", "--shard-rows", "20",
                 "--batch-tokens", "2048", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["rows"], summary["rows_out"], summary["shards"]) == (46, 46, 3)
    got = pq.read_table(out)
    assert got.column_names == ["id", "row_id", "answer", "score", "start", "end", "model", "model_version"]
    assert got.column("id").to_pylist() == rows.column("id").to_pylist()
    try:
        from transformers import pipeline

        pipe = pipeline("question-answering", model=model, tokenizer=model)
        expected = pipe(question=rows.column("q").to_pylist(), context=rows.column("c").to_pylist())
    except KeyError:  # "The task question-answering has been removed from transformers"
        expected = [dict(zip(("answer", "start", "end", "score"), e)) for e in QA_PIPELINE_4_57_1]
    assert [(a, s, e) for a, s, e in zip(*(got.column(c).to_pylist() for c in ("answer", "start", "end")))] == \
           [(e["answer"], e["start"], e["end"]) for e in expected]
    np.testing.assert_allclose(got.column("score").to_numpy(), [e["score"] for e in expected], rtol=1e-4, atol=1e-6)
    contexts = rows.column("c").to_pylist()
    assert all(contexts[i][r["start"]:r["end"]] == r["answer"] for i, r in enumerate(got.to_pylist()))
