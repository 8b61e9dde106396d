"""The `local` inference backend: rlhi's tiny model and bundled tokenizer, via the sampler."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import data_prep
from rlhi import local_backend  # pylint: disable=unused-import  (backend='local')
from rlhi.data import client as client_lib
from rlhi.data import pipeline
from rlhi.data import wildchat
from rlhi.models import hf_io
from rlhi.models import llama
from rlhi.models import tokenizer as tok_lib

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tiny_hf"))
  config = llama.get_config("tiny")  # the demo's model, with random weights
  params = llama.init_params(config, jax.random.PRNGKey(0))
  hf_io.save_checkpoint(params, config, path)
  tok = tok_lib.load_tokenizer("bundled")
  tok.save_pretrained(path)
  return path, config, params, tok


def _argmax_rollout(params, config, prompt, n, stop_ids):
  """Independent greedy decode: full forward pass per token, no cache, no padding."""
  ids = list(prompt)
  width = 128  # right padding (segment id 0) cannot change causal logits; one compile
  fwd = jax.jit(lambda p, t, s: llama.forward_logits(p, config, t, None, s))
  for _ in range(n):
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :len(ids)] = ids
    seg = (np.arange(width) < len(ids)).astype(np.int32)[None]
    logits = fwd(params, tokens, seg)
    nxt = int(jnp.argmax(logits[0, len(ids) - 1]))
    ids.append(nxt)
    if nxt in stop_ids:
      break
  return ids[len(prompt):]


def test_local_backend_greedy_equals_an_argmax_rollout(checkpoint):
  path, config, params, tok = checkpoint
  cfg = client_lib.default_config()
  cfg.backend, cfg.checkpoint, cfg.local_batch_size = "local", path, 4
  convs = [[{"role": "user", "content": "how do i reverse a list in python"}],
           [{"role": "system", "content": "Terse."},
            {"role": "user", "content": "hola, una receta rápida?"}],
           [{"role": "user", "content": "hi"}]]
  with client_lib.make_client(cfg) as client:
    assert client.name.startswith("local")
    results = client.chat([client_lib.ChatRequest(key=f"k{i}", messages=tuple(c),
                                                  max_tokens=12)
                           for i, c in enumerate(convs)])
    stats = client.stats()
  # Counted as a server's usage would be: one "sent" per request, the tokens spent.
  assert stats["requests"] == stats["sent"] == 3 and stats["failed"] == 0
  assert stats["prompt_tokens"] == sum(r.prompt_tokens for r in results) > 0
  assert stats["completion_tokens"] == sum(r.completion_tokens for r in results) > 0
  fmt = tok_lib.ChatFormatter(tok)
  for conv, res in zip(convs, results):
    assert res.ok, res.error
    prompt = fmt.encode(conv).prompt_ids
    want = _argmax_rollout(params, config, prompt, 12, fmt.stop_ids)
    assert res.completion_tokens == len(want)
    assert res.text == fmt.decode(want).strip()
    assert res.prompt_tokens == len(prompt)


@pytest.mark.slow  # 20-90 s on 2 cores; CI runs it
def test_a_data_stage_runs_on_the_local_model(checkpoint, tmp_path):
  path, *_ = checkpoint
  cfg = data_prep.get_config("sample")
  rows = (tmp_path / "rows.jsonl")
  with open(wildchat.SAMPLE_ROWS) as f:
    rows.write_text("".join(f.readlines()[:6]))  # a few conversations: CPU time
  cfg.ingest.source = str(rows)
  pipeline.run_stage("ingest", cfg, str(tmp_path))
  cfg.client = client_lib.default_config()
  cfg.client.backend, cfg.client.checkpoint = "local", path
  cfg.classify.max_tokens = 8
  # A random tiny model writes no valid JSON: the stage fails (above its failure
  # budget) after writing its report...
  with pytest.raises(pipeline.StageFailedError, match=r"classify: \d+ of \d+ items"):
    pipeline.run_stage("classify", cfg, str(tmp_path))
  # ...and within a budget that allows it, every follow-up is accounted for as a reject
  # with its reason, after exactly one re-ask each (the re-run asks them all again:
  # rejected answers are not cached).
  cfg.max_failure_fraction = 1.0
  report = pipeline.run_stage("classify", cfg, str(tmp_path))
  assert report["classified"] + sum(report["rejected"].values()) == report["follow_ups"]
  assert report["follow_ups"] > 0
  assert report["requests"]["requests"] == 2 * report["follow_ups"]


def test_local_backend_needs_a_checkpoint():
  cfg = client_lib.default_config()
  cfg.backend = "local"
  with pytest.raises(ValueError, match="needs 'checkpoint'"):
    client_lib.make_client(cfg)


def test_answers_are_reported_batch_by_batch(checkpoint, tmp_path):
  """Each generated batch is reported (and cached) when it finishes, not at the end."""
  path, *_ = checkpoint
  cfg = client_lib.default_config()
  cfg.backend, cfg.checkpoint, cfg.local_batch_size = "local", path, 2
  events = []
  with client_lib.make_client(cfg) as client:
    generate = client._generator.generate  # pylint: disable=protected-access
    client._generator.generate = lambda convs, **kw: (  # pylint: disable=protected-access
        events.append(("generate", len(convs))) or generate(convs, **kw))
    reqs = [client_lib.ChatRequest(key=f"k{i}", messages=(
        {"role": "user", "content": f"question {i}"},), max_tokens=3) for i in range(5)]
    client._answer(reqs, lambda i, r: events.append(("result", r.key)))  # pylint: disable=protected-access
  assert events == [("generate", 2), ("result", "k0"), ("result", "k1"),
                    ("generate", 2), ("result", "k2"), ("result", "k3"),
                    ("generate", 1), ("result", "k4")]


def test_the_data_package_never_imports_the_local_backend():
  """rlhi.data builds 'local' only once rlhi.local_backend registered it, and says so."""
  code = ("import sys\n"
          "from rlhi.data import client, pipeline\n"
          "try:\n"
          "  client.make_client({'backend': 'local', 'checkpoint': 'smollm2'})\n"
          "except ValueError as e:\n"
          "  print(e)\n"
          "print('jax' in sys.modules, 'rlhi.local_backend' in sys.modules)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout
  assert "import rlhi.local_backend first" in out
  assert out.strip().endswith("False False")
