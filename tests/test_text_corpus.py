"""The character-level corpus of the professor-forcing issue: the split by position has no overlap and loses
nothing, characters round-trip, sequences do not overlap, and bad corpora and lengths are clear errors."""

import pytest
import torch

from experiments.data import DataError, TextCorpus, load_text_corpus

TEXT = "The quick brown fox jumps over the lazy dog.\n" * 40 + "Zebra!"


def _corpus(tmp_path, text=TEXT, name="t.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return load_text_corpus(path)


def test_the_split_by_position_partitions_the_text_and_round_trips(tmp_path):
    c = _corpus(tmp_path)
    assert isinstance(c, TextCorpus) and c.alphabet == "".join(sorted(set(TEXT)))
    # 90 / 5 / 5 by position: the three parts, in order, are exactly the text (no overlap, nothing lost)
    assert c.decode(torch.cat([c.train, c.valid, c.test])) == TEXT
    n = len(TEXT)
    assert (c.train.numel(), c.valid.numel()) == (int(0.9 * n), int(0.95 * n) - int(0.9 * n))
    assert c.decode(c.encode("lazy dog")) == "lazy dog"
    with pytest.raises(ValueError, match="not in the corpus' alphabet"):
        c.encode("lazy cat~")


def test_sequences_are_non_overlapping_cuts_of_their_split(tmp_path):
    c = _corpus(tmp_path)
    s = c.sequences("train", 50)
    assert s.shape == (c.train.numel() // 50, 50)
    assert torch.equal(s.reshape(-1), c.train[: s.numel()])
    for bad in (1, 0, c.valid.numel() + 1, 2.5):
        with pytest.raises(ValueError, match="sequence length must be an integer in 2.."):
            c.sequences("valid", bad)
    with pytest.raises(ValueError, match="split must be"):
        c.sequences("dev", 10)


def test_bad_corpora_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no such text file"):
        load_text_corpus(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="the corpus is empty"):
        _corpus(tmp_path, "  \n\n", "empty.txt")
    with pytest.raises(DataError, match="too few to split"):
        _corpus(tmp_path, "abcdefg", "short.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1") * 100)
    with pytest.raises(DataError, match="not UTF-8 text"):
        load_text_corpus(tmp_path / "latin1.txt")
    import experiments.data as data

    monkeypatch.setattr(data, "FORTUNES_DIR", tmp_path / "no-fortunes")
    with pytest.raises(DataError, match="apt-get install fortunes"):
        load_text_corpus()


def test_the_fortunes_corpus_reads_its_english_files(tmp_path, monkeypatch):
    import experiments.data as data

    d = tmp_path / "fortunes"
    d.mkdir()
    (d / "b").write_text("Second file.\n%\nAnother one.\n")
    (d / "a").write_text("First file.\n%\n")
    (d / "a.dat").write_bytes(b"\x00\x01binary index")
    (d / "a.u8").symlink_to(d / "a")
    monkeypatch.setattr(data, "FORTUNES_DIR", d)
    c = load_text_corpus()
    assert c.name == "fortunes"
    text = c.decode(torch.cat([c.train, c.valid, c.test]))
    assert text == "First file.\n\nSecond file.\nAnother one."  # sorted files, % lines gone, no index


def test_downsampling_averages_blocks_for_the_sequential_pixel_experiment():
    from experiments.data import downsample

    x = torch.arange(16, dtype=torch.float32).reshape(1, 16) / 15  # one 4 x 4 image
    d = downsample(x, (4, 4))
    assert d.shape == (1, 4)
    assert torch.allclose(d * 15, torch.tensor([[2.5, 4.5, 10.5, 12.5]]))  # (0+1+4+5)/4, (2+3+6+7)/4, ...
    with pytest.raises(ValueError, match="a factor dividing"):
        downsample(x, (4, 4), 3)
