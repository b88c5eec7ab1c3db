"""The BGE-M3 model folder: a tiny M3 model saved by save_m3_folder loads unchanged in FlagEmbedding's
BGEM3FlagModel and FlagModel and in SentenceTransformer, and each gives what our Encoder gives; a folder
without a head file is refused unless dense-only is asked for; save -> load reproduces the model exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from chuxin_ray import demo
from chuxin_ray.config import EncoderRuntime
from chuxin_ray.models.encoder import Encoder
from chuxin_ray.models.m3 import M3Embedder, M3Heads, special_token_ids
from chuxin_ray.models.m3_folder import (
    COLBERT_FILE,
    SPARSE_FILE,
    DenseEmbedder,
    ModelFolderError,
    folder_pooling,
    load_m3_folder,
    save_m3_folder,
)
from chuxin_ray.models.tiny import tiny_xlmr_config

pytestmark = pytest.mark.integration

TOL = 1e-5
MAX_LENGTH = 48  # some texts are longer: truncation is compared too
BATCH = 4  # several batches of different padded lengths
QUERY_INSTRUCTION = "为这个句子生成表示以用于检索相关文章："
FP32 = EncoderRuntime(batch_size=BATCH, precision="fp32")


def build_m3(root: Path, corpus: list[str], seed: int = 0) -> tuple[M3Embedder, object]:
    """A tiny XLM-R encoder on a 1000-id demo tokenizer trained on `corpus`, with random M3 heads."""
    from transformers import AutoModel, AutoTokenizer

    tok_dir = demo.train_tokenizer(corpus, root / "tokenizer", vocab_size=1000)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    # XLM-R's tokenizer returns no token_type_ids (one segment type); keep the demo tokenizer alike (saved).
    tok.model_input_names = tok.init_kwargs["model_input_names"] = ["input_ids", "attention_mask"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # initializer_range 0.5: at 0.02 a tiny random encoder maps every text to nearly one vector
        config = tiny_xlmr_config(vocab_size=len(tok), dropout=0.0, initializer_range=0.5)
        encoder = AutoModel.from_config(config)
        heads = M3Heads(config.hidden_size, zeroed_token_ids=special_token_ids(tok))
    return M3Embedder(encoder, heads).eval(), tok


def build_m3_folder(root: Path, query_instruction: str = QUERY_INSTRUCTION) -> Path:
    """A saved tiny M3 folder whose chuxin_ray.json records where it came from."""
    embedder, tok = build_m3(root, demo.people_daily()[:1000])
    folder = root / "m3"
    save_m3_folder(
        embedder,
        tok,
        folder,
        query_instruction=query_instruction,
        model_name="tiny-m3",
        provenance={"stage": "unified", "base_model": "tiny"},
    )
    return folder


@pytest.fixture(scope="module")
def news():
    return demo.people_daily()[:1016]  # parsed once: ~3 s a call


@pytest.fixture(scope="module")
def built(tmp_path_factory, news):
    root = tmp_path_factory.mktemp("m3")
    embedder, tok = build_m3(root, news[:1000])
    folder = root / "m3"
    files = save_m3_folder(embedder, tok, folder, query_instruction=QUERY_INSTRUCTION, model_name="tiny-m3")
    return embedder, tok, folder, files


@pytest.fixture(scope="module")
def texts(news):
    return [t[: 5 + 9 * i] for i, t in enumerate(news[1000:1010])] + [
        "",
        "BGE-M3 检索 检索 检索",
    ]  # short to truncated


@pytest.fixture(scope="module")
def queries(news):
    return [t[:12] for t in news[1010:1016]]


def test_folder_layout(built):
    _, _, folder, files = built
    for name in ("config.json", "model.safetensors", "tokenizer.json", COLBERT_FILE, SPARSE_FILE):
        assert name in files
    assert "modules.json" in files and "1_Pooling/config.json" in files
    assert json.loads((folder / "1_Pooling/config.json").read_text())["pooling_mode_cls_token"] is True
    st_config = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert st_config["prompts"] == {"query": QUERY_INSTRUCTION}
    meta = json.loads((folder / "chuxin_ray.json").read_text())
    assert meta["colbert_dim"] == 32 and meta["query_instruction"] == QUERY_INSTRUCTION
    assert set(torch.load(folder / COLBERT_FILE, weights_only=True)) == {"weight", "bias"}


def test_bgem3flagmodel_gives_what_our_encoder_gives(built, texts, queries):
    from FlagEmbedding import BGEM3FlagModel

    _, _, folder, _ = built
    ours = Encoder(str(folder), runtime=FP32, heads="require")
    flag = BGEM3FlagModel(
        str(folder), use_fp16=False, devices="cpu", query_instruction_for_retrieval=QUERY_INSTRUCTION
    )
    both = {"return_dense": True, "return_sparse": True, "return_colbert_vecs": True}
    for theirs, mine in (
        (
            flag.encode(texts, batch_size=BATCH, max_length=MAX_LENGTH, **both),
            ours.encode(texts, MAX_LENGTH, want=("dense", "sparse", "colbert")),
        ),
        (
            flag.encode_queries(queries, batch_size=BATCH, max_length=MAX_LENGTH, **both),
            ours.encode(
                queries, MAX_LENGTH, instruction=QUERY_INSTRUCTION, want=("dense", "sparse", "colbert")
            ),
        ),
    ):
        np.testing.assert_allclose(mine.dense, theirs["dense_vecs"], atol=TOL)
        assert len(mine.sparse) == len(theirs["lexical_weights"])
        for ours_w, their_w in zip(mine.sparse, theirs["lexical_weights"], strict=True):
            assert sorted(ours_w) == sorted(int(k) for k in their_w)
            np.testing.assert_allclose([ours_w[int(k)] for k in their_w], list(their_w.values()), atol=TOL)
        for ours_v, their_v in zip(mine.colbert, theirs["colbert_vecs"], strict=True):
            assert ours_v.shape == their_v.shape
            np.testing.assert_allclose(ours_v, their_v, atol=TOL)
    # the comparison means something: texts differ, weights are sparse, truncation happened
    assert np.abs(mine.dense[0] - mine.dense[1]).max() > 1e-2
    full = ours.encode(texts, MAX_LENGTH, want=("sparse", "colbert"))
    assert full.dense is None and max(len(v) for v in full.colbert) == MAX_LENGTH - 1
    assert all(len(w) > 0 for w in full.sparse[:-2])


def test_flagmodel_and_sentence_transformers_give_our_dense_vectors(built, texts, queries):
    from FlagEmbedding import FlagModel
    from sentence_transformers import SentenceTransformer

    _, _, folder, _ = built
    ours = Encoder(str(folder), runtime=FP32)
    flag = FlagModel(
        str(folder), use_fp16=False, devices="cpu", query_instruction_for_retrieval=QUERY_INSTRUCTION
    )
    np.testing.assert_allclose(
        ours.encode(texts, MAX_LENGTH).dense,
        flag.encode_corpus(texts, batch_size=BATCH, max_length=MAX_LENGTH),
        atol=TOL,
    )
    np.testing.assert_allclose(
        ours.encode(queries, MAX_LENGTH, instruction=QUERY_INSTRUCTION).dense,
        flag.encode_queries(queries, batch_size=BATCH, max_length=MAX_LENGTH),
        atol=TOL,
    )
    st = SentenceTransformer(str(folder), device="cpu")
    assert st.max_seq_length == 512
    np.testing.assert_allclose(ours.encode(texts, 512).dense, st.encode(texts, batch_size=BATCH), atol=TOL)
    np.testing.assert_allclose(
        ours.encode(queries, 512, instruction=QUERY_INSTRUCTION).dense,
        st.encode(queries, prompt_name="query", batch_size=BATCH),
        atol=TOL,
    )


def test_save_load_round_trip_is_exact(built, texts):
    embedder, tok, folder, _ = built
    loaded, loaded_tok = load_m3_folder(folder)
    assert isinstance(loaded, M3Embedder)
    assert loaded.heads.zeroed_token_ids.tolist() == special_token_ids(tok)
    batch = tok(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    assert (
        loaded_tok(texts, padding=True, truncation=True, max_length=MAX_LENGTH)["input_ids"]
        == batch["input_ids"].tolist()
    )
    with torch.inference_mode():
        before = embedder(batch["input_ids"], batch["attention_mask"])
        after = loaded(batch["input_ids"], batch["attention_mask"])
    for name, a, b in zip(before._fields, before, after, strict=True):
        assert torch.equal(a, b), name
    # the dense-only path of the Encoder is the heads' dense vector
    encoder = Encoder(str(folder), runtime=FP32)
    np.testing.assert_allclose(
        encoder.encode(texts, MAX_LENGTH).dense,
        encoder.encode(texts, MAX_LENGTH, want=("dense", "sparse")).dense,
        atol=1e-7,
    )


def test_missing_head_file_fails_loudly_unless_dense_only(built, texts, tmp_path):
    _, _, folder, _ = built
    dense_only = tmp_path / "dense-only"
    shutil.copytree(folder, dense_only)
    (dense_only / SPARSE_FILE).unlink()
    with pytest.raises(ModelFolderError, match=SPARSE_FILE) as error:
        load_m3_folder(dense_only)
    assert str(dense_only) in str(error.value)
    with pytest.raises(ModelFolderError, match=SPARSE_FILE):
        Encoder(str(dense_only), runtime=FP32, heads="require")

    model, _ = load_m3_folder(dense_only, heads="optional")
    assert isinstance(model, DenseEmbedder) and model.pooling == "cls"
    encoder = Encoder(str(dense_only), runtime=FP32)
    np.testing.assert_allclose(
        encoder.encode(texts, MAX_LENGTH).dense,
        Encoder(str(folder), runtime=FP32).encode(texts, MAX_LENGTH).dense,
    )
    with pytest.raises(ModelFolderError, match="dense vectors only"):
        encoder.encode(texts, MAX_LENGTH, want=("dense", "sparse"))


def test_mean_pooling_of_a_sentence_transformers_folder_is_honoured(built, texts, tmp_path):
    from sentence_transformers import SentenceTransformer

    _, _, folder, _ = built
    mean = tmp_path / "mean"
    shutil.copytree(folder, mean)
    for name in (COLBERT_FILE, SPARSE_FILE):
        (mean / name).unlink()
    pooling = json.loads((mean / "1_Pooling/config.json").read_text())
    pooling.update(pooling_mode_cls_token=False, pooling_mode_mean_tokens=True)
    (mean / "1_Pooling/config.json").write_text(json.dumps(pooling))

    encoder = Encoder(str(mean), runtime=FP32)
    assert encoder.model.pooling == "mean"
    st = SentenceTransformer(str(mean), device="cpu")
    np.testing.assert_allclose(encoder.encode(texts, 512).dense, st.encode(texts, batch_size=BATCH), atol=TOL)

    # sentence-transformers 5.x writes `pooling_mode`; a mode we do not implement is refused
    (mean / "1_Pooling/config.json").write_text(
        json.dumps({"embedding_dimension": 32, "pooling_mode": "mean"})
    )
    assert folder_pooling(mean) == "mean"
    (mean / "1_Pooling/config.json").write_text(
        json.dumps({"embedding_dimension": 32, "pooling_mode": "max"})
    )
    with pytest.raises(ModelFolderError, match="pooling 'max'"):
        load_m3_folder(mean, heads="optional")


def test_wrong_head_shape_fails_with_the_file_and_shapes(built, tmp_path):
    _, _, folder, _ = built
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    torch.save({"weight": torch.zeros(32, 31), "bias": torch.zeros(32)}, bad / COLBERT_FILE)
    with pytest.raises(ModelFolderError, match=r"colbert_linear\.pt.*\(32, 31\).*hidden size 32"):
        load_m3_folder(bad)
    torch.save({"weight": torch.zeros(2, 32), "bias": torch.zeros(2)}, bad / COLBERT_FILE)
    torch.save({"weight": torch.zeros(2, 32), "bias": torch.zeros(2)}, bad / SPARSE_FILE)
    with pytest.raises(ModelFolderError, match=r"sparse_linear\.pt.*\(2, 32\)"):
        load_m3_folder(bad)
