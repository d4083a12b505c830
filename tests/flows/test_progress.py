"""A run without a terminal (stderr to a file or pipe, as under a scheduler or a Prefect worker) logs its
progress at a steady interval with a rate and the time left, and the libraries' own bars stay quiet."""
import logging
import re

from hfbatch.flows.cli import main


def test_training_evaluation_and_bulk_inference_log_progress_lines(prefect_harness, minilm, sst2_split, tmp_path,
                                                                   capsys, caplog, monkeypatch):
    monkeypatch.setenv("HFBATCH_PROGRESS_INTERVAL", "0")  # a line at every step (the default is every 30 s)
    store, rows = tmp_path / "store", sst2_split[1]  # 800 SST-2 rows
    with caplog.at_level(logging.INFO):
        assert main(["train", "--dataset", str(rows), "--model", minilm, "--name", "watched", "--store", str(store),
                     "--max-train-samples", "96", "--batch-size", "16", "--max-length", "32", "--json"]) == 0
        assert main(["infer", "--model", "watched", "--store", str(store), "--input", str(rows), "--output",
                     str(tmp_path / "out"), "--shard-rows", "200", "--json"]) == 0
    err = capsys.readouterr().err
    text = caplog.text  # the run loggers' records (the console shows the same lines)
    training = re.findall(r"training: (\d+)/6 steps \(\d+%\), [\d.]+ samples/s, (?:\S+ left|done in \S+), "
                          r"epoch [\d.]+/\d+(?:, loss [\d.]+)?$", text, re.M)
    assert [int(step) for step in training] == [1, 2, 3, 4, 5, 6], text[-3000:]
    assert re.search(r"evaluation: (\d+)/\1 batches \(100%\), [\d.]+ batches/s, done in \S+$", text, re.M)
    inference = re.findall(r"batch inference: (\d+)/800 rows \(\d+%\), [\d.]+ rows/s, (\S+) (?:left|in \S+), "
                           r"\d/4 shards", text)
    assert [int(done) for done, _ in inference] == [200, 400, 600, 800] and inference[0][1] != "done", text[-3000:]
    # the libraries' own progress bars and load reports are held back (--verbose shows them)
    assert not re.search(r"^(Map|Saving the dataset|Loading weights|Flattening the indices)", err, re.M), err[-3000:]
