"""Text encoders: none, a tiny transformers encoder built offline, and precomputed lookups."""

from __future__ import annotations

import pickle

import pytest
import torch

from models.text_encoders import (
    HFTextEncoder,
    NoTextEncoder,
    PrecomputedTextEncoder,
    TextEncoderConfig,
    build_text_encoder,
    precompute_text_embeddings,
    save_precomputed,
)

WORDS = "a red cube on the blue floor walk forward turn left right into dark room".split()
PROMPTS = ["a red cube", "walk forward on the blue floor into a dark room", ""]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(WORDS) + 3, d_model=16, d_kv=4, num_heads=2, num_layers=2, d_ff=32,
                   decoder_start_token_id=0)
    path = tmp_path_factory.mktemp("t5")
    T5EncoderModel(cfg).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def test_none_encoder_returns_no_tokens() -> None:
    enc = build_text_encoder(TextEncoderConfig(kind="none", dim=24))
    assert isinstance(enc, NoTextEncoder) and enc.dim == 24
    tokens, mask = enc.encode(["anything", ""])
    assert tokens.shape == (2, 0, 24) and mask.shape == (2, 0) and mask.dtype == torch.bool
    with pytest.raises(TypeError, match="list of strings"):
        enc.encode("a bare string")
    with pytest.raises(ValueError, match="empty list"):
        enc.encode([])
    with pytest.raises(ValueError, match="unknown text encoder 'clip'"):
        build_text_encoder(TextEncoderConfig(kind="clip"))
    with pytest.raises(ValueError, match="kind 'hf' needs a path"):
        build_text_encoder(TextEncoderConfig(kind="hf"))


def test_hf_encoder_hidden_state_mask_and_layer(t5_dir) -> None:
    from transformers import T5EncoderModel

    enc = build_text_encoder(TextEncoderConfig(kind="hf", path=str(t5_dir), max_length=32))
    assert isinstance(enc, HFTextEncoder) and enc.dim == 16
    tokens, mask = enc.encode(PROMPTS)
    lengths = [len(p.split()) for p in PROMPTS]
    assert tokens.shape == (3, max(lengths), 16) and tokens.dtype == torch.float32
    assert mask.sum(1).tolist() == lengths
    assert (tokens[~mask] == 0).all() and (tokens[mask].abs().sum(-1) > 0).all()

    ref = T5EncoderModel.from_pretrained(t5_dir)
    ids = _tokenizer()(PROMPTS[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = ref(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(tokens[1], out.last_hidden_state[0])
    # Padding does not leak: the short prompt alone equals its padded row.
    alone, _ = enc.encode(PROMPTS[:1])
    torch.testing.assert_close(alone[0], tokens[0, : lengths[0]], atol=1e-5, rtol=1e-5)

    first = build_text_encoder(TextEncoderConfig(kind="hf", path=str(t5_dir), layer=1))
    torch.testing.assert_close(first.encode(PROMPTS[1:2])[0][0], out.hidden_states[1][0])
    short = build_text_encoder(TextEncoderConfig(kind="hf", path=str(t5_dir), max_length=4))
    assert short.encode(PROMPTS)[0].shape[1] == 4
    bad = build_text_encoder(TextEncoderConfig(kind="hf", path=str(t5_dir), layer=7))
    with pytest.raises(ValueError, match="layer 7 out of range for 3 hidden states"):
        bad.encode(PROMPTS)


def test_hf_encoder_pipeline_layout_with_automodel(tmp_path) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(WORDS) + 3, hidden_size=12, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=32, pad_token_id=0)
    BertModel(cfg).save_pretrained(tmp_path / "text_encoder")
    _tokenizer().save_pretrained(tmp_path / "tokenizer")
    enc = build_text_encoder(TextEncoderConfig(kind="hf", path=str(tmp_path), dtype="bf16"))
    assert enc.dim == 12 and next(enc.model.parameters()).dtype == torch.bfloat16
    tokens, mask = enc.encode(PROMPTS[:2])
    assert tokens.dtype == torch.float32 and tokens.shape == (2, 10, 12) and mask.sum().item() == 13
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_text_encoder(TextEncoderConfig(kind="hf", path=str(tmp_path / "nowhere")))


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_precomputed_matches_the_encoder_it_came_from(t5_dir, tmp_path, suffix) -> None:
    hf = build_text_encoder(TextEncoderConfig(kind="hf", path=str(t5_dir)))
    path = precompute_text_embeddings(hf, PROMPTS + PROMPTS[:1], tmp_path / f"emb{suffix}", batch_size=2)
    enc = build_text_encoder(TextEncoderConfig(kind="precomputed", path=str(path)))
    assert isinstance(enc, PrecomputedTextEncoder) and len(enc) == 3 and enc.dim == 16
    assert PROMPTS[0] in enc and "unseen" not in enc
    batch = [PROMPTS[2], PROMPTS[0], PROMPTS[1]]
    tokens, mask = enc.encode(batch)
    ref_tokens, ref_mask = hf.encode(batch)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(tokens, ref_tokens, atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match="no embedding for caption 'a green sphere'"):
        enc.encode(["a red cube", "a green sphere"])
    # Pickles for DataLoader workers and reopens the file lazily.
    clone = pickle.loads(pickle.dumps(enc))
    assert torch.equal(clone.encode(batch)[0], tokens)


def test_precomputed_truncates_and_validates(tmp_path) -> None:
    embs = {"long": torch.randn(10, 8), "short": torch.randn(2, 8)}
    path = save_precomputed(tmp_path / "e.safetensors", embs, dtype=torch.bfloat16)
    enc = build_text_encoder(TextEncoderConfig(kind="precomputed", path=str(path), max_length=4))
    tokens, mask = enc.encode(["short", "long"])
    assert tokens.shape == (2, 4, 8) and mask.sum(1).tolist() == [2, 4]
    torch.testing.assert_close(tokens[1], embs["long"][:4].bfloat16().float())
    with pytest.raises(ValueError, match=r"caption 'bad': expected \[L, 8\], got \[3, 5\]"):
        save_precomputed(tmp_path / "f.safetensors", {"ok": torch.zeros(1, 8), "bad": torch.zeros(3, 5)})
    with pytest.raises(ValueError, match="must end in .safetensors or .npz"):
        save_precomputed(tmp_path / "f.pt", embs)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="is not a worldsmith.text_embeddings.v1 file"):
        PrecomputedTextEncoder(str(tmp_path / "other.safetensors"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PrecomputedTextEncoder(str(tmp_path / "missing.safetensors"))
