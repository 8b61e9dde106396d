"""gs:// work directories, exercised offline through the real remote code path.

etils.epath sends gs:// to fsspec when tensorflow is not installed (and here it is made
to, in case it is). fsspec is given an in-memory filesystem under the "gs"/"gcs"
protocols that refuses what GCS refuses (appending, updating in place), so everything
from rlhi.fileio down to epath's fsspec backend runs as it would against a bucket; only
gcsfs's HTTP calls are replaced. datasets' save_to_disk / load_from_disk reach the same
filesystem through fsspec.
"""

import contextlib
import importlib
import json
import os
import socket
import subprocess
import sys
import struct

from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
import fsspec
from fsspec.implementations import memory
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from configs import data_prep
from rlhi import fileio
from rlhi import reports
from rlhi import sharding
from rlhi import workdir_lock
from rlhi.data import files
from rlhi.data import pipeline
from rlhi.data import schema
from rlhi.models import hf_io
from rlhi.models import llama
from rlhi.models import reward
from rlhi.models import reward_io
from rlhi.models import tokenizer as tok_lib
from rlhi.train import metrics

TINY = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
            num_kv_heads=1, head_dim=32)


class _FakeGCS(memory.MemoryFileSystem):
  """gs:// in memory, with the restrictions of GCS objects that matter to callers."""

  protocol = ("gs", "gcs")
  store = {}
  pseudo_dirs = [""]

  @classmethod
  def _strip_protocol(cls, path):
    path = fsspec.utils.stringify_path(path)
    return super()._strip_protocol(path.removeprefix("gs://").removeprefix("gcs://"))

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode or "+" in mode:
      raise NotImplementedError(f"GCS objects cannot be appended to ({path}, {mode})")
    return super()._open(path, mode, **kwargs)


def _clear_epath_cache():
  """epath keeps the filesystem it got from fsspec for "gcs"."""
  # pylint: disable-next=protected-access
  epath_backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.fixture
def gcs(monkeypatch, tmp_path):
  """The fake bucket's store (path -> file); the test runs in tmp_path."""
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  monkeypatch.setattr(_FakeGCS, "store", {})
  monkeypatch.setattr(_FakeGCS, "pseudo_dirs", [""])
  # fsspec has no unregister: remember what was there (normally nothing: gcsfs is
  # imported lazily from known_implementations) and put it back.
  # pylint: disable-next=protected-access
  registry = importlib.import_module("fsspec.registry")._registry
  saved = {p: registry.get(p) for p in ("gs", "gcs")}
  for p in saved:
    fsspec.register_implementation(p, _FakeGCS, clobber=True)
  _FakeGCS.clear_instance_cache()
  _clear_epath_cache()
  monkeypatch.setenv("RLHI_CACHE_DIR", str(tmp_path / "local_cache"))
  monkeypatch.chdir(tmp_path)
  # pylint: disable-next=protected-access
  assert epath.Path("gs://b/x")._backend is epath_backend.fsspec_backend
  yield _FakeGCS.store
  for p, cls in saved.items():
    if cls is None:
      registry.pop(p, None)
    else:
      registry[p] = cls
  _clear_epath_cache()
  # The bug this guards against: a local directory literally named "gs:".
  assert not os.path.exists(tmp_path / "gs:")


def _remote_files(store, prefix):
  return sorted(k[len(prefix):] for k in store if k.startswith(prefix))


# ----------------------------------------------------------------------------------------
# rlhi.fileio
# ----------------------------------------------------------------------------------------


def test_fileio_basics(gcs, tmp_path):
  assert fileio.is_remote("gs://b/x") and fileio.is_remote("s3://b/x")
  assert not fileio.is_remote("/tmp/x") and not fileio.is_remote("meta-llama/Llama-3")
  with fileio.open("gs://b/d/t.txt", "w") as f:
    f.write("héllo ✓\n")
  assert gcs["/b/d/t.txt"].getvalue() == "héllo ✓\n".encode()  # UTF-8 whatever locale
  with fileio.open("gs://b/d/t.txt") as f:
    assert f.read() == "héllo ✓\n"
  assert fileio.exists("gs://b/d/t.txt") and not fileio.exists("gs://b/d/nope")
  assert fileio.isdir("gs://b/d") and fileio.listdir("gs://b/d") == ["t.txt"]
  with pytest.raises(ValueError, match="append"):
    fileio.open("gs://b/d/t.txt", "a")
  # A block that fails leaves no object behind (closing a remote file would upload).
  with pytest.raises(RuntimeError), fileio.atomic_write("gs://b/d/partial.json") as f:
    f.write("{")
    raise RuntimeError("boom")
  assert not fileio.exists("gs://b/d/partial.json")
  with fileio.local_output("gs://b/out", is_dir=True) as local:
    os.makedirs(os.path.join(local, "sub"))
    for name in ("a.txt", "sub/b.txt"):
      with open(os.path.join(local, name), "w") as f:
        f.write(name)
  assert _remote_files(gcs, "/b/out/") == ["a.txt", "sub/b.txt"]
  with fileio.local_input("gs://b/out", include=lambda n: n != "skip") as local:
    assert os.listdir(local) == ["a.txt"]  # top-level files only
  with fileio.local_input("gs://b/out/sub/b.txt") as local, open(local) as f:
    assert f.read() == "sub/b.txt"
  # Local paths are passed through untouched.
  with fileio.local_input(str(tmp_path)) as local:
    assert local == str(tmp_path)


# ----------------------------------------------------------------------------------------
# Data: JSONL, reports, the stages.
# ----------------------------------------------------------------------------------------


def test_jsonl_round_trip_and_errors_name_file_and_line(gcs):
  pairs = [schema.Message("user", "hi"), schema.Message("assistant", "ça va ✓")]
  assert schema.write_jsonl("gs://b/data/m.jsonl", pairs) == 2
  assert "/b/data/m.jsonl.tmp" not in gcs  # no temp object left behind
  assert schema.read_jsonl("gs://b/data/m.jsonl", schema.Message) == pairs
  with fileio.open("gs://b/data/bad.jsonl", "wb") as f:
    f.write(b'{"role": "user", "content": "ok"}\n{"role": "robot", "content": "x"}\n'
            b'\xff\xfe\n')
  with pytest.raises(schema.SchemaError,
                     match=r"^gs://b/data/bad\.jsonl:2: field 'role'"):
    schema.read_jsonl("gs://b/data/bad.jsonl", schema.Message)
  rejects = []
  assert len(schema.read_jsonl("gs://b/data/bad.jsonl", schema.Message, lenient=True,
                               rejects=rejects)) == 1
  assert [(r.source, r.line, r.reason) for r in rejects] == [
      ("gs://b/data/bad.jsonl", 2, "schema"),
      ("gs://b/data/bad.jsonl", 3, "invalid_utf8")]


def test_write_report(gcs):
  reports.write_report("gs://b/run", "eval", {"accuracy": 0.5, "név": "✓"},
                        "# Eval\n")
  with fileio.open("gs://b/run/eval_report.json") as f:
    assert f.read() == '{\n  "accuracy": 0.5,\n  "név": "✓"\n}\n'
  assert gcs["/b/run/eval_report.md"].getvalue() == b"# Eval\n"


def test_data_stages_on_gcs_equal_a_local_run(gcs, tmp_path):
  cfg = data_prep.get_config("sample")
  local = str(tmp_path / "local")
  for stage in pipeline.STAGES:
    pipeline.run_stage(stage, cfg, local)
    pipeline.run_stage(stage, cfg, "gs://b/data")
  local_files = sorted(
      os.path.relpath(os.path.join(root, f), local)
      for root, _, names in os.walk(local) for f in names
      if not f.startswith(files.LLM_CACHE) and f != workdir_lock.LOCK_FILE)
  remote_files = [f for f in _remote_files(gcs, "/b/data/") if f != files.LLM_CACHE]
  assert remote_files == local_files  # the remote lock object is gone after the run
  for name in local_files:
    if name.endswith((".json", ".jsonl", ".md")):
      with open(os.path.join(local, name), "rb") as f:
        assert gcs["/b/data/" + name].getvalue() == f.read(), name
  import datasets  # pylint: disable=g-import-not-at-top
  dd = datasets.load_from_disk("gs://b/data/" + files.PAIRS_HF)
  assert dd["train"].num_rows == len(schema.read_jsonl(
      "gs://b/data/pairs_rewrites.train.jsonl", schema.PreferencePair)) > 0

  # The request cache went up to the bucket: from there alone (a new machine, no
  # local copy), a re-run asks for nothing.
  assert "/b/data/" + files.LLM_CACHE in gcs
  cache_dir = os.path.dirname(pipeline.local_llm_cache("gs://b/data"))
  assert cache_dir.startswith(str(tmp_path / "local_cache"))
  for name in os.listdir(cache_dir):
    os.remove(os.path.join(cache_dir, name))
  again = pipeline.run_stage("classify", cfg, "gs://b/data")
  assert again["requests"]["cached"] == again["follow_ups"] > 0
  # With both a local and a remote copy, they are merged; still nothing asked.
  again = pipeline.run_stage("persona", cfg, "gs://b/data")
  assert again["requests"]["cached"] == again["requests"]["requests"] > 0


def test_data_package_does_not_import_jax():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ("import rlhi.data.pipeline, rlhi.fileio, sys; "
          "assert 'jax' not in sys.modules, 'jax imported'")
  subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------
# Models: HF checkpoints, reward models, tokenizers.
# ----------------------------------------------------------------------------------------


def _assert_trees_equal(a, b):
  fa, ta = jax.tree.flatten(a)
  fb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(fa, fb):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_hf_checkpoint_round_trip(gcs, tmp_path):
  config = llama.get_config("tiny", **TINY)
  params = llama.init_params(config, jax.random.PRNGKey(0))
  hf_io.save_checkpoint(params, config, "gs://b/run/hf")
  assert _remote_files(gcs, "/b/run/hf/") == [
      hf_io.CONFIG_FILE, hf_io.GENERATION_CONFIG_FILE, hf_io.SINGLE_FILE]
  # The same bytes as a local export.
  hf_io.save_checkpoint(params, config, str(tmp_path / "hf"))
  for name in _remote_files(gcs, "/b/run/hf/"):
    with open(tmp_path / "hf" / name, "rb") as f:
      assert gcs["/b/run/hf/" + name].getvalue() == f.read(), name
  assert hf_io.load_config("gs://b/run/hf") == config
  loaded_config, loaded = hf_io.load_checkpoint("gs://b/run/hf")
  assert loaded_config == config
  _assert_trees_equal(loaded, params)


def test_hf_checkpoint_sharded_into_a_mesh_and_unscanned(gcs):
  # Every layout kind: q/k/v biases (qwen2) and tied embeddings too.
  config = llama.get_config("tiny", **dict(TINY, num_heads=4, num_kv_heads=2),
                            qkv_bias=True, tie_embeddings=True)
  params = llama.init_params(config, jax.random.PRNGKey(1))
  params = jax.tree.map(  # random biases, not zeros, so that slicing them matters
      lambda x: x + jax.random.normal(jax.random.PRNGKey(2), x.shape, x.dtype), params)
  hf_io.save_checkpoint(params, config, "gs://b/hf2", max_shard_size=100_000)
  files = _remote_files(gcs, "/b/hf2/")
  assert hf_io.INDEX_FILE in files and sum(f.endswith(".safetensors") for f in files) > 2
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  shardings = sharding.logical_shardings(llama.abstract_params(config), mesh)
  _, loaded = hf_io.load_checkpoint("gs://b/hf2", config, shardings=shardings)
  q = loaded["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  _assert_trees_equal(loaded, params)
  # Unscanned: per-layer leaves; and without the index (listing + headers).
  unscanned, per_layer = hf_io.load_checkpoint("gs://b/hf2", scan_layers=False)
  assert "layers_1" in per_layer
  np.testing.assert_array_equal(
      np.asarray(per_layer["layers_1"]["self_attn"]["q_proj"]["bias"]),
      np.asarray(params["layers"]["self_attn"]["q_proj"]["bias"][1]))
  del gcs["/b/hf2/" + hf_io.INDEX_FILE]
  _, no_index = hf_io.load_checkpoint("gs://b/hf2", unscanned)
  _assert_trees_equal(no_index, per_layer)


def test_remote_safetensors_slices_equal_safe_open(gcs, tmp_path):
  rng = np.random.default_rng(0)
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  tensors = {"m": rng.normal(size=(7, 5)).astype(np.float32),
             "b": rng.normal(size=(6, 3)).astype(ml_dtypes.bfloat16),
             "v": rng.normal(size=(9,)).astype(np.float16),
             "s": np.asarray(3.5, np.float32)}
  local = str(tmp_path / "t.safetensors")
  safetensors.numpy.save_file(tensors, local)
  fileio.copy_file(local, "gs://b/t.safetensors")
  indices = [(slice(1, 4), slice(0, 5)), (slice(0, 7), slice(2, 3)), (slice(6, 2, -2),),
             (slice(5, 5),), (2,), (-1, slice(1, 3)), (slice(None),), ...]
  with contextlib.ExitStack() as stack:
    # pylint: disable-next=protected-access
    remote = fileio.open_safetensors("gs://b/t.safetensors", stack)
    ref = stack.enter_context(safetensors.safe_open(local, framework="numpy"))
    assert sorted(remote.keys()) == sorted(ref.keys())
    for name in ("m", "b", "v"):
      sl = remote.get_slice(name)
      assert sl.get_shape() == list(tensors[name].shape)
      for idx in indices:
        if name == "v" and isinstance(idx, tuple) and len(idx) > 1:
          continue
        got, want = sl[idx], tensors[name][idx]
        assert got.dtype == want.dtype and got.shape == want.shape, (name, idx)
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(remote.get_tensor("s"), ref.get_tensor("s"))


def test_reward_model_and_tokenizer_round_trip(gcs, monkeypatch):
  config = llama.get_config("tiny", **TINY)
  params = reward.init_params(config, jax.random.PRNGKey(1))
  params["score"] = {"kernel": jax.random.normal(jax.random.PRNGKey(2), (64,)),
                     "bias": jnp.asarray(0.25, jnp.float32)}
  tok = tok_lib.load_tokenizer("bundled")
  reward_io.save(params, config, "gs://b/rm", tokenizer=tok,
                 system_template="User:\n{persona}")
  files = _remote_files(gcs, "/b/rm/")
  assert {"tokenizer.json", reward_io.META_FILE, "score/head.safetensors",
          hf_io.SINGLE_FILE} <= set(files)
  assert reward_io.load_metadata("gs://b/rm")["system_template"] == "User:\n{persona}"
  loaded_config, loaded = reward_io.load("gs://b/rm")
  assert loaded_config == config
  _assert_trees_equal(loaded, params)

  # The tokenizer from the same directory: only its own files come down.
  copied = []
  copy_file = fileio.copy_file
  monkeypatch.setattr(fileio, "copy_file",
                      lambda src, dst: (copied.append(os.path.basename(src)),
                                        copy_file(src, dst)))
  remote_tok = tok_lib.load_tokenizer("gs://b/rm")
  assert "tokenizer.json" in copied
  assert not any(n.endswith(".safetensors") for n in copied), copied
  assert reward_io.META_FILE in copied  # harmless small files come along
  assert remote_tok.name_or_path == "gs://b/rm"
  msgs = [{"role": "user", "content": "Hello there ✓"}]
  fmt, remote_fmt = tok_lib.ChatFormatter(tok), tok_lib.ChatFormatter(remote_tok)
  assert remote_fmt.encode(msgs, "Hi!", persona="p") == fmt.encode(msgs, "Hi!",
                                                                   persona="p")
  assert remote_tok.chat_template == tok.chat_template


def test_tokenizer_save_and_load(gcs):
  tok = tok_lib.load_tokenizer("bundled")
  tok_lib.save_tokenizer(tok, "gs://b/tok")
  assert "tokenizer.json" in _remote_files(gcs, "/b/tok/")
  again = tok_lib.load_tokenizer("gs://b/tok")
  text = "A persona-conditioned reward ✓"
  assert again(text)["input_ids"] == tok(text)["input_ids"]
  with pytest.raises(FileNotFoundError, match="gs://b/nope"):
    tok_lib.load_tokenizer("gs://b/nope")


# ----------------------------------------------------------------------------------------
# Training metrics.
# ----------------------------------------------------------------------------------------


def _events(data: bytes):
  """Scalar (tag, step, value) of a TensorBoard events file (TFRecord framing)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out, pos = [], 0
  while pos < len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
    pos += 12 + n + 4
    out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
  return out


def test_metric_writer_on_gcs_uploads_and_resumes(gcs):
  w = metrics.MetricWriter("gs://b/run", 10, enabled=True, sync_secs=0.0)
  w.write(1, {"loss": np.float32(2.0)})
  w.write(2, {"loss": jnp.asarray(1.5)})
  # Uploaded during the run (sync_secs=0), before close.
  assert gcs["/b/run/metrics.jsonl"].getvalue().count(b"\n") == 2
  w.write(2, {"accuracy": 0.75}, prefix="eval")
  w.close()
  lines = fileio.read_bytes("gs://b/run/metrics.jsonl").decode().splitlines()
  assert lines == ['{"step": 1, "train/loss": 2.0}', '{"step": 2, "train/loss": 1.5}',
                   '{"eval/accuracy": 0.75, "step": 2}']
  (events_file,) = _remote_files(gcs, "/b/run/tb/")
  assert events_file.startswith("events.out.tfevents.")
  assert _events(gcs["/b/run/tb/" + events_file].getvalue()) == [
      ("train/loss", 1, 2.0), ("train/loss", 2, 1.5), ("eval/accuracy", 2, 0.75)]

  # A resumed run appends to metrics.jsonl, as a local one does; by default it
  # uploads at close.
  w = metrics.MetricWriter("gs://b/run", 10, initial_step=2, enabled=True)
  w.write(3, {"loss": 1.0})
  assert gcs["/b/run/metrics.jsonl"].getvalue().count(b"\n") == 3
  w.close()
  lines = fileio.read_bytes("gs://b/run/metrics.jsonl").decode().splitlines()
  assert len(lines) == 4 and lines[-1] == '{"step": 3, "train/loss": 1.0}'


def test_metric_writer_local_is_unchanged(tmp_path):
  w = metrics.MetricWriter(str(tmp_path / "run"), 5, enabled=True)
  w.write(1, {"loss": 3.0})
  # Local: flushed line by line, as before.
  assert (tmp_path / "run" / "metrics.jsonl").read_text() == (
      '{"step": 1, "train/loss": 3.0}\n')
  w.close()
  assert len(os.listdir(tmp_path / "run" / "tb")) == 1


# ----------------------------------------------------------------------------------------
# Evaluation: UserEval on a gs:// workdir.
# ----------------------------------------------------------------------------------------


def test_usereval_on_gcs(gcs, tmp_path):
  # pylint: disable=g-import-not-at-top
  import json
  from configs import eval as eval_config
  from rlhi.data import items as items_lib
  from rlhi.eval import report as report_lib
  from rlhi.eval import usereval
  from rlhi.testing.openai_server import OpenAIServer
  # pylint: enable=g-import-not-at-top

  # A data-prep output, made locally and copied to the bucket.
  local_data = str(tmp_path / "data")
  cfg = data_prep.get_config("sample")
  for stage in ("ingest", "persona"):
    pipeline.run_stage(stage, cfg, local_data)
  fileio.upload_tree(local_data, "gs://b/data")
  its = items_lib.load_items("gs://b/data", max_items=5).items
  assert len(its) == 5
  schema.write_jsonl("gs://b/answers.jsonl",
                     [{"item_id": it.item_id, "text": f"B-ANSWER {k}"}
                      for k, it in enumerate(its)])

  def prefers_b(body):
    prompt = body["messages"][0]["content"]
    shown_first = prompt.split("<response_a>")[1].split("</response_a>")[0]
    choice = "A" if "B-ANSWER" in shown_first else "B"
    return json.dumps({"overall": choice, "personalization": choice,
                       "instruction_following": choice})

  ecfg = eval_config.get_config("b=answers,max_items=5")
  ecfg.data.dir = "gs://b/data"
  ecfg.systems.b.path = "gs://b/answers.jsonl"
  ecfg.n_boot = 50
  c = ecfg.judge.client
  with OpenAIServer(prefers_b) as server:
    c.base_url, c.model, c.timeout_s, c.max_retries = server.base_url, "judge", 10.0, 1
    c.backoff_base_s = c.backoff_max_s = 0.01
    report = usereval.run_usereval(ecfg, "gs://b/eval")
    assert server.counters()["requests"] == 2 * 5
    assert report["win_rates"]["overall"]["all"]["win_rate"] == 1.0
    assert report["systems"]["b"]["path"] == "gs://b/answers.jsonl"
    assert report["systems"]["b"]["label"] == "answers b/answers.jsonl"
    files = _remote_files(gcs, "/b/eval/")
    assert {report_lib.MD_FILE, report_lib.JSON_FILE, report_lib.PNG_FILE,
            usereval.ITEMS_FILE, usereval.GENERATIONS_FILE, usereval.JUDGEMENTS_FILE,
            usereval.REJECTS_FILE, usereval.CACHE_FILE} <= set(files), files
    assert gcs["/b/eval/" + report_lib.PNG_FILE].getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    with fileio.open("gs://b/eval/" + report_lib.JSON_FILE) as f:
      assert json.load(f)["win_rates"] == report["win_rates"]
    with fileio.open("gs://b/eval/" + report_lib.MD_FILE) as f:
      assert "Win rate of **B over A**" in f.read()

    # Resumable from the bucket alone (no local copy of the judge's cache): a re-run
    # asks the judge nothing.
    cache_dir = os.path.dirname(pipeline.local_llm_cache("gs://b/eval"))
    assert cache_dir.startswith(str(tmp_path / "local_cache"))
    for name in os.listdir(cache_dir):
      os.remove(os.path.join(cache_dir, name))
    server.clear()
    again = usereval.run_usereval(ecfg, "gs://b/eval")
    assert server.counters()["requests"] == 0
    assert again["requests"]["cached"] == 2 * 5
    assert again["generation"]["systems"]["b"]["reused"] == 5
  assert not os.path.exists(tmp_path / "gs:")


def test_generated_answers_are_appended_to_a_gcs_file(gcs):
  # pylint: disable=g-import-not-at-top
  import types
  from rlhi.data import items as items_lib
  from rlhi.eval import systems
  # pylint: enable=g-import-not-at-top

  class FakeGenerator:
    config = types.SimpleNamespace(max_position_embeddings=1 << 20)
    fmt = types.SimpleNamespace(
        encode=lambda messages: types.SimpleNamespace(prompt_ids=[1, 2, 3]))
    calls = 0

    def generate(self, conversations, **unused_kwargs):
      FakeGenerator.calls += 1
      # After the first chunk, the bucket already holds its answers.
      n_lines = fileio.read_bytes(out).count(b"\n") if fileio.exists(out) else 0
      assert n_lines == 1 + 4 * (FakeGenerator.calls - 1)
      return [types.SimpleNamespace(text=f"answer {len(c)}", prompt_tokens=3,
                                    completion_tokens=2, finished=True)
              for c in conversations]

  fileio.write_bytes("gs://b/ckpt/model.safetensors", b"weights")
  system = systems.System(key="b", kind="checkpoint", path="gs://b/ckpt")
  gen = systems.GenerationSettings(batch_size=1)
  fp = systems.fingerprint(system, gen)
  fileio.write_bytes("gs://b/ckpt/model.safetensors", b"other weights")
  assert systems.fingerprint(system, gen) != fp  # the weights' size is in it

  out = "gs://b/eval/generations.jsonl"
  fileio.write_bytes(out, b'{"earlier": "line"}\n')  # what a crashed run left
  items = [items_lib.EvalItem(
      item_id=f"i{k}", user_id="u", conversation_hash="h", message_index=0,
      turn_type="initial", context=(schema.Message("user", "hi"),), original=None,
      persona=None) for k in range(6)]
  answerer = systems.Answerer(gen)
  # pylint: disable-next=protected-access
  answerer._generators[("gs://b/ckpt", "")] = FakeGenerator()
  answers, _ = answerer.answer(system, items, append_to=out)
  assert FakeGenerator.calls == 2  # chunks of 4 answers
  assert len(answers) == 6
  records, rejects = systems.read_records(out)
  assert not rejects and len(records) == 7 and records[0] == {"earlier": "line"}
  assert [r["item_id"] for r in records[1:]] == [f"i{k}" for k in range(6)]


def test_a_remote_workdir_lock_names_its_holder_and_takes_over_a_dead_one(gcs):
  lock = "gs://b/run/" + workdir_lock.LOCK_FILE
  other = {"host": "tpu-vm-7", "pid": 12, "command": "train_dpo", "since": "then"}
  fileio.makedirs("gs://b/run")
  fileio.write_bytes(lock, json.dumps(other).encode())
  with pytest.raises(workdir_lock.WorkdirBusyError,
                     match=r"in use by `train_dpo` \(pid 12 on host tpu-vm-7.*If that "
                           r"run is dead, delete gs://b/run/\.rlhi\.lock"):
    with workdir_lock.hold("gs://b/run", "train_sft"):
      pass
  # A holder on this host whose process is gone: the lock is taken over, then removed.
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  fileio.write_bytes(lock, json.dumps(other | {"host": socket.gethostname(),
                                               "pid": int(dead.stdout)}).encode())
  with workdir_lock.hold("gs://b/run", "train_sft"):
    assert json.loads(fileio.read_bytes(lock))["pid"] == os.getpid()
  assert not fileio.exists(lock)
  assert "/b/run/.rlhi.lock" not in gcs
