"""Tests of landmark.data: corpus reading, tokenizers, cached token arrays, landmarks and windows."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from landmark.data import (
    CorpusError,
    Document,
    SequentialWindows,
    Tokenizer,
    WindowSampler,
    bundled_books,
    insert_landmarks,
    landmark_example,
    landmark_mask,
    landmark_targets,
    load_split,
    prepare_data,
    read_corpus,
    tokenize_split,
)
from landmark.data import dataset as dataset_module
from landmark.data.books import BOOKS_ARCHIVE, cache_root
from landmark.data.corpus import document_family, split_documents
from landmark.data.dataset import split_pieces, token_dtype

IGN = -100
WORDS = ["the", "whale", "sea", "ship", "ahab", "and", "of", "to", "a", "in", "his", "was", "white"]
ROUND_TRIP_TEXTS = [
    "",
    "Call me Ishmael.",
    "  leading and trailing spaces  ",
    "tabs\tand\n\nnewlines\r\nand CRLF\n",
    "unicode: naïve café, 日本語のテキスト, emoji 🐋🌊, Ελληνικά, עברית",
    "special strings: <landmark> <|endoftext|> <landmark><landmark>",
    "\n\n\n   \t \n",
    "numbers 1234567890 3.14159 and punctuation !?;:'\"()[]{}",
    "it's they're we've I'm you'll he'd",
    "\x00 control \x1f chars and \u200b zero width",
]


def _text(rng: random.Random, n_words: int) -> str:
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if rng.random() < 0.1:
            lines.append(" ".join(line) + rng.choice([".", ",", "!", "", "  "]))
            line = []
    lines.append(" ".join(line))
    return "\n".join(lines) + "\n"


def make_folder(root: Path, n_docs: int = 12, seed: int = 0) -> Path:
    rng = random.Random(seed)
    for i in range(n_docs):
        path = root / ("sub" if i % 3 == 0 else "") / f"doc{i:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_text(rng, 300 + 40 * i), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def bpe(corpus_dir) -> Tokenizer:
    corpus = read_corpus(corpus_dir)
    texts = [d.read_text() for d in corpus.splits["train"]] + ROUND_TRIP_TEXTS
    return Tokenizer.train(texts, vocab_size=300)


def gpt2_dir() -> Path:
    return Path(os.environ.get("LANDMARK_GPT2_DIR", cache_root() / "gpt2"))


# ----------------------------------------------------------------------------------------- corpus


def test_plain_folder_is_read_recursively_sorted_and_split_deterministically(tmp_path):
    root = make_folder(tmp_path / "c")
    (root / "empty.txt").write_bytes(b"")  # zero-byte files are skipped
    (root / "notes.md").write_text("not a document")
    corpus = read_corpus(root)
    assert corpus.layout == "folder"
    train, val = corpus.splits["train"], corpus.splits["validation"]
    names = sorted(d.name for d in train + val)
    assert names == sorted(f"{'sub/' if i % 3 == 0 else ''}doc{i:02d}.txt" for i in range(12))
    assert [d.name for d in train] == sorted(d.name for d in train)
    assert len(train) >= 1 and len(val) >= 1
    assert [d.name for d in read_corpus(root).splits["validation"]] == [d.name for d in val]
    # The split depends only on relative paths: a copy elsewhere splits the same way.
    copy = make_folder(tmp_path / "copy")
    assert [d.name for d in read_corpus(copy).splits["validation"]] == [d.name for d in val]


def test_split_fraction_and_both_splits_non_empty(tmp_path):
    for i in range(400):
        (tmp_path / f"d{i:03d}.txt").write_text("x")
    corpus = read_corpus(tmp_path)
    assert 8 <= len(corpus.splits["validation"]) <= 40  # ~5% of 400
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.txt").write_text("a")
    (two / "b.txt").write_text("b")
    splits = read_corpus(two, validation_fraction=0.99).splits
    assert len(splits["train"]) == 1 and len(splits["validation"]) == 1


def test_pg19_layout_is_used_as_given(tmp_path):
    for split, n in [("train", 3), ("validation", 1), ("test", 2)]:
        make_folder(tmp_path / split, n_docs=n)
    corpus = read_corpus(tmp_path)
    assert corpus.layout == "pg19"
    assert {k: len(v) for k, v in corpus.splits.items()} == {"train": 3, "validation": 1, "test": 2}
    assert corpus.splits["validation"][0].name == "validation/sub/doc00.txt"


@pytest.mark.parametrize(
    "case, needle",
    [
        ("missing", "does not exist"),
        ("no_txt", "no .txt files"),
        ("all_empty", "are empty"),
        ("single", "single non-empty document"),
        ("pg19_empty_split", "no .txt files"),
    ],
)
def test_corpus_errors_say_what_to_fix(tmp_path, case, needle):
    root = tmp_path / "c"
    if case != "missing":
        root.mkdir()
    if case == "no_txt":
        (root / "a.md").write_text("x")
    if case == "all_empty":
        (root / "a.txt").write_text("")
        (root / "b.txt").write_text("")
    if case == "single":
        (root / "only.txt").write_text("text")
    if case == "pg19_empty_split":
        make_folder(root / "train", n_docs=2)
        (root / "validation").mkdir()
    with pytest.raises(CorpusError, match=needle) as err:
        read_corpus(root)
    assert str(root) in str(err.value)
    assert "\n" not in str(err.value)


def test_non_utf8_document_names_file_and_offset(tmp_path):
    make_folder(tmp_path, n_docs=3)
    (tmp_path / "latin1.txt").write_bytes("abc café".encode("latin-1"))
    corpus = read_corpus(tmp_path)
    doc = next(d for split in corpus.splits.values() for d in split if d.name == "latin1.txt")
    with pytest.raises(CorpusError, match=r"latin1\.txt is not valid UTF-8 \(bad byte at offset 7\)"):
        doc.read_text()


# -------------------------------------------------------------------------------------- tokenizer


def test_bpe_round_trip_and_specials(bpe, tmp_path):
    assert bpe.vocab_size == 300
    assert {bpe.eot_id, bpe.landmark_id} == {0, 1}
    for text in ROUND_TRIP_TEXTS:
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
        assert bpe.landmark_id not in ids and bpe.eot_id not in ids
        assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.encode_batch(ROUND_TRIP_TEXTS) == [bpe.encode(t) for t in ROUND_TRIP_TEXTS]
    hello = bpe.encode("the whale")
    assert bpe.decode([*hello, bpe.landmark_id, bpe.eot_id]) == "the whale<|endoftext|>"
    bpe.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.fingerprint == bpe.fingerprint
    assert loaded.encode_batch(ROUND_TRIP_TEXTS) == bpe.encode_batch(ROUND_TRIP_TEXTS)
    assert loaded.landmark_id not in loaded.encode("<landmark>")


def test_bpe_training_is_deterministic(corpus_dir, bpe):
    corpus = read_corpus(corpus_dir)
    texts = [d.read_text() for d in corpus.splits["train"]] + ROUND_TRIP_TEXTS
    assert Tokenizer.train(texts, vocab_size=300).fingerprint == bpe.fingerprint
    with pytest.raises(ValueError, match="vocab_size must be between 258"):
        Tokenizer.train(texts, vocab_size=100)


def test_gpt2_tokenizer(tmp_path):
    folder = gpt2_dir()
    if not (folder / "encoder.json").is_file() or not (folder / "vocab.bpe").is_file():
        pytest.skip(
            f"GPT-2 BPE files absent from {folder}: run `bash scripts/fetch_gpt2_bpe.sh` "
            "(or set LANDMARK_GPT2_DIR to a folder with encoder.json and vocab.bpe)"
        )
    tok = Tokenizer.gpt2(folder)
    assert (tok.vocab_size, tok.eot_id, tok.landmark_id) == (50258, 50256, 50257)
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's published ids
    assert tok.encode(" <|endoftext|>") == [1279, 91, 437, 1659, 5239, 91, 29]  # as ordinary text
    for text in ROUND_TRIP_TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.landmark_id not in ids and tok.eot_id not in ids
    data = prepare_data(
        make_folder(tmp_path / "c", 3), tmp_path / "p", "gpt2", gpt2_dir=folder, progress=False
    )
    assert data.splits["train"].tokens.dtype == np.uint16 and data.splits["train"].tokens[-1] == 50256
    assert Tokenizer.load(tmp_path / "p").fingerprint == tok.fingerprint


def test_gpt2_missing_files_say_how_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"fetch_gpt2_bpe\.sh"):
        Tokenizer.gpt2(tmp_path)


def test_split_pieces_never_changes_tokens(bpe):
    rng = random.Random(1)
    parts = [_text(rng, 50), "  \n", "\n\n", " x\n", "\t", "y \n z\n", "日本\n語\n", "'s\n"]
    text = "".join(rng.choice(parts) for _ in range(3000))
    pieces = split_pieces(text, piece_chars=64)
    assert len(pieces) > 10 and "".join(pieces) == text
    assert [i for ids in bpe.encode_batch(pieces) for i in ids] == bpe.encode(text)


# ----------------------------------------------------------------------------------------- landmarks


@pytest.mark.parametrize("block_size", [2, 3, 4, 7, 64])
@pytest.mark.parametrize("n", [0, 1, 5, 63, 126, 200])
def test_insert_landmarks_positions(block_size, n):
    L = -1
    tokens = torch.arange(2 * n).reshape(2, n)  # (B, n)
    out = insert_landmarks(tokens, block_size, L)  # (B, n + n // (bs - 1))
    assert out.shape == (2, n + n // (block_size - 1))
    is_mark = out[0] == L
    assert torch.equal(is_mark, landmark_mask(out.shape[-1], block_size))
    assert torch.equal(out[:, ~is_mark], tokens)


def test_landmark_example_by_hand():
    a, b, c, d, e, f, g, h, i = range(10, 19)
    L = 99
    input_ids, targets = landmark_example(torch.tensor([a, b, c, d, e, f, g, h, i]), 4, L)
    assert input_ids.tolist() == [a, b, c, L, d, e, f, L, g, h]
    assert targets.tolist() == [b, c, d, IGN, e, f, g, IGN, h, i]
    assert input_ids.dtype == targets.dtype == torch.int64
    # Without the extra raw token, the last regular position has no target.
    assert landmark_targets(input_ids, 4).tolist() == [b, c, d, IGN, e, f, g, IGN, h, IGN]
    assert landmark_targets(input_ids[:8], 4).tolist() == [b, c, d, IGN, e, f, IGN, IGN]


def test_landmark_targets_agree_with_landmark_example():
    raw = torch.randint(0, 50, (3, 8 * 7 + 1))
    input_ids, targets = landmark_example(raw, 8, 1000)  # (3, 64)
    assert input_ids.shape == (3, 64) and input_ids[:, -1].eq(1000).all()
    from_ids = landmark_targets(input_ids, 8)
    assert torch.equal(from_ids[:, :-2], targets[:, :-2])
    assert from_ids[:, -2:].eq(IGN).all() and targets[:, -1].eq(IGN).all()


# -------------------------------------------------------------------------------------------- windows


def test_windows_start_on_block_boundaries():
    tokens = np.arange(5000, dtype=np.uint16)  # token value == raw offset
    bs, seq_len, L = 8, 32, 60000
    sampler = WindowSampler(tokens, seq_len, batch_size=16, landmark_id=L, block_size=bs, seed=3)
    for step in range(20):
        starts = sampler.starts(step)
        assert (starts % (bs - 1) == 0).all() and (starts + 28 + 1 <= len(tokens)).all()
        batch = sampler.batch(step)
        assert batch.input_ids.shape == batch.targets.shape == (16, seq_len)
        assert batch.input_ids.dtype == batch.targets.dtype == torch.int64
        marks = landmark_mask(seq_len, bs)
        assert batch.input_ids[:, marks].eq(L).all() and batch.targets[:, marks].eq(IGN).all()
        regular = batch.input_ids[:, ~marks]  # (16, 28) consecutive raw tokens from the start
        assert torch.equal(regular, torch.from_numpy(starts)[:, None] + torch.arange(28))
        assert torch.equal(batch.targets[:, ~marks], regular + 1)


def test_window_errors():
    tokens = np.arange(1000, dtype=np.uint16)
    with pytest.raises(ValueError, match=r"block_size \(64\) must divide seq_len \(100\)"):
        WindowSampler(tokens, 100, 2, landmark_id=5, block_size=64)
    with pytest.raises(ValueError, match="landmark_id"):
        WindowSampler(tokens, 128, 2, block_size=64)
    with pytest.raises(ValueError, match="fewer than one window needs"):
        WindowSampler(tokens[:50], 64, 2, landmark_id=5, block_size=64)


def test_batches_are_reproducible_and_resumable():
    tokens = np.random.default_rng(0).integers(0, 300, 20_000).astype(np.uint16)
    make = lambda **kw: WindowSampler(tokens, 64, 4, landmark_id=1, block_size=16, **kw)  # noqa: E731
    a, b = make(seed=7), make(seed=7)
    for step in (0, 1, 1000):
        assert torch.equal(a.batch(step).input_ids, b.batch(step).input_ids)
    assert not torch.equal(a.batch(0).input_ids, a.batch(1).input_ids)
    assert not torch.equal(a.batch(0).input_ids, make(seed=8).batch(0).input_ids)
    assert not torch.equal(a.batch(0).input_ids, make(seed=7, rank=1).batch(0).input_ids)
    resumed = a.iter_from(5)
    assert all(torch.equal(next(resumed).targets, a.batch(s).targets) for s in range(5, 8))


def test_plain_windows_without_landmarks():
    tokens = np.arange(1000, dtype=np.uint32)
    sampler = WindowSampler(tokens, 50, 8, landmarks=False, seed=1)  # no block constraint
    batch = sampler.batch(0)
    assert batch.input_ids.shape == (8, 50)
    assert torch.equal(batch.targets, batch.input_ids + 1)
    assert torch.equal(batch.input_ids[:, 0], torch.from_numpy(sampler.starts(0)))


@pytest.mark.parametrize("landmarks", [True, False])
def test_sequential_windows_cover_the_split_without_overlap(landmarks):
    tokens = np.arange(1000, dtype=np.uint16)
    kw = {"landmark_id": 9999, "block_size": 8} if landmarks else {"landmarks": False}
    windows = SequentialWindows(tokens, 32, batch_size=3, **kw)
    batches = list(windows)
    assert len(batches) == len(windows)
    inputs = torch.cat([b.input_ids for b in batches])
    regular = inputs[inputs != 9999].reshape(len(inputs), -1)  # (windows, n)
    n = 28 if landmarks else 32
    assert windows.num_windows == 999 // n
    assert torch.equal(regular.flatten(), torch.arange(windows.num_windows * n))
    if landmarks:  # every window starts on a block boundary and ends with a landmark
        assert (regular[:, 0] % 7 == 0).all() and inputs[:, -1].eq(9999).all()


# ------------------------------------------------------------------------------------ token arrays


def test_prepare_writes_memmaps_and_reuses_them(corpus_dir, tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    data = prepare_data(corpus_dir, out, vocab_size=300, progress=False)
    tok = data.tokenizer
    assert Tokenizer.load(out).fingerprint == tok.fingerprint
    corpus = read_corpus(corpus_dir)
    for name, split in data.splits.items():
        assert split.tokens.dtype == np.uint16 and isinstance(split.tokens, np.memmap)
        docs = corpus.splits[name]
        assert split.documents == [d.name for d in docs]
        expected = [i for d in docs for i in [*tok.encode(d.read_text()), tok.eot_id]]
        assert split.tokens.tolist() == expected
        ends = [*split.doc_starts[1:], len(split.tokens)]
        assert all(split.tokens[e - 1] == tok.eot_id for e in ends)
        assert split.meta["tokenizer"] == tok.fingerprint and split.meta["corpus"] == corpus.fingerprint(name)
    # Second run: nothing retrained or retokenised.
    mtime = (out / "train.bin").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("retokenised or retrained a cached split")

    monkeypatch.setattr(dataset_module, "tokenize_split", fail)
    monkeypatch.setattr(Tokenizer, "train", fail)
    again = prepare_data(corpus_dir, out, vocab_size=300, progress=False)
    assert (out / "train.bin").stat().st_mtime_ns == mtime
    assert again.tokenizer.fingerprint == tok.fingerprint
    assert np.array_equal(again.splits["train"].tokens, data.splits["train"].tokens)


def test_a_damaged_tokenizer_is_trained_again_with_a_warning(corpus_dir, tmp_path, capsys):
    """A prepared folder whose tokenizer.json was cut short: said on stderr, then trained again (the same
    tokenizer: the training is deterministic), and the token arrays kept."""
    out = tmp_path / "prepared"
    tok = prepare_data(corpus_dir, out, vocab_size=300, progress=False).tokenizer
    text = (out / "tokenizer.json").read_text()
    (out / "tokenizer.json").write_text(text[: len(text) // 2])
    again = prepare_data(corpus_dir, out, vocab_size=300, progress=False)
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {out / 'tokenizer.json'} is damaged (") and "training it again" in err
    assert again.tokenizer.fingerprint == tok.fingerprint == Tokenizer.load(out).fingerprint


def test_prepare_removes_the_temporary_arrays_of_killed_preparations(corpus_dir, tmp_path):
    """A preparation killed while writing leaves ``.<split>.bin.tmp<pid>``: the next one removes it, but
    keeps the temporary array of a preparation that still runs (its process is alive)."""
    out = tmp_path / "prepared"
    prepare_data(corpus_dir, out, vocab_size=300, progress=False)
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = out / f".train.bin.tmp{int(child.stdout)}"  # a process that has ended
    alive = out / f".validation.bin.tmp{os.getpid()}"
    dead.write_bytes(b"\0" * 64)
    alive.write_bytes(b"\0" * 64)
    prepare_data(corpus_dir, out, vocab_size=300, progress=False)
    assert not dead.exists() and alive.exists()


def test_prepare_redoes_what_the_corpus_change_touches(tmp_path, bpe):
    root = make_folder(tmp_path / "c", n_docs=6)
    out = tmp_path / "prepared"
    before = prepare_data(root, out, tokenizer=bpe, progress=False)
    val_mtime = (out / "validation.bin").stat().st_mtime_ns
    with open(root / before.splits["train"].documents[0], "a", encoding="utf-8") as f:
        f.write("one more line\n")
    after = prepare_data(root, out, tokenizer=bpe, progress=False)
    assert len(after.splits["train"]) > len(before.splits["train"])
    assert after.splits["validation"].meta == before.splits["validation"].meta
    assert (out / "validation.bin").stat().st_mtime_ns == val_mtime
    # A trained BPE belongs to its train split: changing that split trains it again.
    first = prepare_data(root, tmp_path / "bpe", vocab_size=300, progress=False).tokenizer
    with open(root / before.splits["train"].documents[0], "a", encoding="utf-8") as f:
        f.write("whales whales whales whales\n")
    second = prepare_data(root, tmp_path / "bpe", vocab_size=300, progress=False).tokenizer
    assert second.fingerprint != first.fingerprint


def test_prepare_redoes_an_edit_that_keeps_the_size_and_the_modification_time(tmp_path, bpe):
    """A document rewritten with the same number of bytes and its modification time set back (touch -r)
    was served from the cache: the change time, which no program can set back, is in the key."""
    import os

    root = make_folder(tmp_path / "c", n_docs=6)
    out = tmp_path / "prepared"
    before = prepare_data(root, out, tokenizer=bpe, progress=False)
    doc = root / before.splits["train"].documents[0]
    st = doc.stat()
    text = doc.read_text(encoding="utf-8")
    doc.write_text(text[::-1], encoding="utf-8")  # the same bytes, reversed: same size
    os.utime(doc, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert doc.stat().st_size == st.st_size and doc.stat().st_mtime_ns == st.st_mtime_ns
    after = prepare_data(root, out, tokenizer=bpe, progress=False)
    assert not np.array_equal(after.splits["train"].tokens, before.splits["train"].tokens)


def test_tokenize_split_leaves_no_partial_file(tmp_path, bpe, monkeypatch):
    root = make_folder(tmp_path / "c", n_docs=5)
    (root / "zz_bad.txt").write_bytes(b"fine text then \xff bad")
    docs = read_corpus(root).splits
    docs = sorted(docs["train"] + docs["validation"], key=lambda d: d.name)
    assert docs[-1].name == "zz_bad.txt"
    monkeypatch.setattr(dataset_module, "BATCH_CHARS", 100)  # several batches written before the error
    out = tmp_path / "out"
    with pytest.raises(CorpusError, match=r"zz_bad\.txt is not valid UTF-8 \(bad byte at offset 15\)"):
        tokenize_split(docs, bpe, out / "train.bin", "fp", progress=False)
    assert list(out.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="not prepared"):
        load_split(out, "train")


def test_prepare_writes_nothing_for_a_corpus_with_a_file_that_is_not_utf8(tmp_path):
    """A bad file in the validation split was found after the tokenizer and the train split were
    written: every document is decoded before anything is written."""
    root = make_folder(tmp_path / "c", n_docs=6)
    validation = read_corpus(root).splits["validation"][0]
    validation.path.write_bytes(b"fine text then \xff bad")
    out = tmp_path / "out"
    with pytest.raises(CorpusError, match=r"is not valid UTF-8 \(bad byte at offset 15\)"):
        prepare_data(root, out, vocab_size=300, progress=False)
    assert not out.exists()


def test_whitespace_only_split_is_an_error(tmp_path, bpe):
    (tmp_path / "a.txt").write_text("  \n\n")
    st = (tmp_path / "a.txt").stat()
    doc = Document("a.txt", tmp_path / "a.txt", st.st_size, st.st_mtime_ns)
    with pytest.raises(CorpusError, match="every document of split 'train' is empty"):
        tokenize_split([doc], bpe, tmp_path / "out" / "train.bin", "fp", progress=False)
    assert not any(p.suffix == ".bin" for p in (tmp_path / "out").iterdir())


def test_token_dtype():
    assert token_dtype(300) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(50258) == np.uint16


# -------------------------------------------------------------------------------- bundled corpus


def test_bundled_archive_holds_the_books():
    with tarfile.open(BOOKS_ARCHIVE, "r:xz") as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    assert len(names) == 284 and all(n.startswith("books/") and n.endswith(".txt") for n in names)
    assert BOOKS_ARCHIVE.stat().st_size < 8_000_000
    notes = BOOKS_ARCHIVE.parent
    assert (notes / "PROVENANCE.md").is_file() and "CC-BY 2.5" in (notes / "LICENSE-NOTES.md").read_text()


def test_bundled_books_extract_once_atomically(tmp_path, monkeypatch):
    archive = tmp_path / "mini.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        for name, text in [("books/a.txt", "alpha\n"), ("books/sub/b.txt", "beta\n")]:
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
    monkeypatch.setenv("LANDMARK_CACHE", str(tmp_path / "cache"))
    books = bundled_books(archive=archive)
    assert books == tmp_path / "cache" / "books"
    assert (books / "sub" / "b.txt").read_text() == "beta\n"
    assert os.listdir(tmp_path / "cache") == ["books"]  # no temporary folder left
    (books / "a.txt").write_text("changed\n")
    assert bundled_books(archive=archive) == books and (books / "a.txt").read_text() == "changed\n"
    with pytest.raises(FileNotFoundError, match="not found"):
        bundled_books(tmp_path / "other", archive=tmp_path / "missing.tar.xz")


def test_bundled_validation_split_holds_long_books_and_addresses():
    """The stratified rule on the bundled books (names and sizes read from the archive, nothing extracted)."""
    with tarfile.open(BOOKS_ARCHIVE, "r:xz") as tar:
        docs = [
            Document(m.name.removeprefix("books/"), Path(m.name), m.size, 0)
            for m in tar.getmembers()
            if m.isfile() and m.size > 0
        ]
    docs.sort(key=lambda d: d.name)
    splits = split_documents(docs)
    val = {d.name: d.size for d in splits["validation"]}
    assert len(val) == 16 and len(splits["train"]) == 268  # 5.6% of the documents
    assert "moby_dick.txt" in val and "kjv_bible.txt" not in val
    assert {"shakespeare_hamlet.txt", "milton_comus.txt"} <= set(val)
    assert sum(n.startswith("sotu/") for n in val) == 12
    assert sum(val.values()) > 2_400_000  # about 600k BPE tokens; far more than 250k
    assert split_documents(list(reversed(docs)))["validation"] == splits["validation"]  # order-free


def test_split_is_stratified_by_family_and_length(tmp_path):
    def doc(name: str, size: int) -> Document:
        return Document(name, tmp_path / name, size, 0)

    docs = [doc(f"play_{i:02d}.txt", 1000 + i) for i in range(40)]  # family "play", longest is play_39
    docs += [doc(f"speeches/s{i:02d}.txt", 10 + i) for i in range(20)]  # family "speeches/"
    docs += [doc("bible.txt", 10**6), doc("novel.txt", 10**5)]  # singletons, pooled
    assert document_family("speeches/s01.txt") == "speeches/" and document_family("play_01.txt") == "play"
    val = [d.name for d in split_documents(sorted(docs, key=lambda d: d.name), 0.05)["validation"]]
    # play: n=40, m=2 -> ranks 1, 20 (play_38, play_19); speeches: m=1 -> rank 1; pool: novel.
    assert val == ["novel.txt", "play_19.txt", "play_38.txt", "speeches/s18.txt"]


def test_two_tokenizers_of_one_kind_never_share_a_prepared_folder(tmp_path, monkeypatch):
    """The default folder of data prepared with a given Tokenizer is keyed by that tokenizer: preparing a
    corpus for a second model with another tokenizer once rewrote the first one's arrays in place."""
    monkeypatch.setenv("LANDMARK_CACHE", str(tmp_path / "cache"))
    corpus = make_folder(tmp_path / "c", 3)
    sample = ["the sea and the ship and the whale at night " * 40]
    first, second = Tokenizer.train(sample, 300), Tokenizer.train([t[::-1] for t in sample], 300)
    assert first.fingerprint != second.fingerprint
    a = prepare_data(corpus, tokenizer=first, progress=False)
    b = prepare_data(corpus, tokenizer=second, progress=False)
    assert a.folder != b.folder
    assert Tokenizer.load(a.folder).fingerprint == first.fingerprint
    assert Tokenizer.load(b.folder).fingerprint == second.fingerprint


def test_prepare_into_a_name_too_long_leaves_no_folder(corpus_dir, tmp_path):
    """``--out p/<300 bytes>``: refused by the file system (ENAMETOOLONG) after ``p`` was made; no folder
    is left (``p`` was)."""
    out = tmp_path / "p" / ("é" * 200)
    with pytest.raises(OSError):
        prepare_data(corpus_dir, out, vocab_size=300, progress=False)
    assert not (tmp_path / "p").exists()
