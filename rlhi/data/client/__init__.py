"""Inference clients: one interface for the LLM calls of the data pipeline.

Classification, persona inference, rewrites and the LLM judge all ask an inference
client for chat completions in batches:

    client = make_client(config.client, cache_path=f"{workdir}/llm_cache.sqlite")
    results = client.chat([ChatRequest(key="classify/ab12/3", messages=(...,))],
                          desc="classify")
    for r in results:
      print(r.key, r.text if r.text is not None else r.error)
    client.close()

`chat()` returns one `ChatResult` per request, in input order. A request that still
fails after its retries is returned with `text=None` and the reason in `error`; it is
never raised, so a stage can write it to its rejects file. `chat()` is synchronous and
also works when called from inside a running event loop (a colab cell): the HTTP backend
runs its own event loop in a background thread.

Config (`cfg`, an ml_collections.ConfigDict; `default_config()` gives every field):
  backend         'openai' | 'reference' | 'local'.
  base_url        OpenAI-compatible server root, e.g. 'http://127.0.0.1:8000/v1'
                  (vLLM, SGLang, TGI, llama.cpp, Ollama, or a hosted API); requests go
                  to f'{base_url}/chat/completions'. Several replicas of one model: a
                  list, or one string separated by commas ('http://a:8000/v1,
                  http://b:8000/v1'); each request goes to the replica with the fewest
                  in flight, away from one that just failed (it cools down for the
                  backoff time) and, on a retry, to another replica than its last
                  attempt's. `replica_stats()` counts requests and failures per replica.
  model           the model name the server expects (vLLM: --served-model-name).
  api_key_env     NAME of the environment variable holding the API key; '' for a server
                  without auth. The key is read once at construction, sent as
                  'Authorization: Bearer', and never logged, cached, or shown in `name`,
                  errors or reprs.
  concurrency     requests in flight at once, per replica.
  timeout_s       per-attempt timeout of one HTTP request, in seconds.
  max_retries     retries after the first attempt (so max_retries + 1 attempts) on 429,
                  408/409/425, 5xx, timeouts, connection errors and undecodable or
                  invalid response bodies. Other 4xx (400/401/403/404/422...) fail at
                  once with the server's message.
  backoff_base_s  exponential backoff with full jitter: before retry n, sleep
  backoff_max_s   uniform(0, min(backoff_max_s, backoff_base_s * 2**(n-1))); a
                  Retry-After header (seconds or HTTP date) replaces that, capped at
                  backoff_max_s.
  reference_path  'reference' backend: JSONL of hand-written annotations, one
                  {"key": ..., "response": ...} per line; '' means the bundled
                  rlhi/data/samples/reference_annotations.jsonl.
  extra_body      dict merged last into every request JSON (e.g. {'top_k': 20} for
                  vLLM, {'chat_template_kwargs': {...}}); may be empty.
  structured_output  how a request that wants JSON asks the server for it:
                  'json_schema' sends the stage's JSON schema as
                  response_format={'type': 'json_schema', 'json_schema': {'name', 'schema',
                  'strict': True}} (OpenAI's spelling, accepted by vLLM >= 0.6, SGLang and
                  the hosted APIs; the server constrains decoding to the schema);
                  'json_object_schema' sends response_format={'type': 'json_object',
                  'schema': ...}, the spelling of llama-cpp-python's server (and
                  llama.cpp's llama-server), which refuses 'json_schema';
                  'json_object' (default) sends response_format={'type': 'json_object'}
                  (any JSON object); 'none' sends neither (servers that refuse or ignore
                  response_format, e.g. `transformers serve`). The answer is validated
                  strictly by the stage whatever the mode (rlhi/data/prompting.py).
  checkpoint      'local' backend: an HF checkpoint directory (what rlhi exports to
                  <workdir>/hf, or a released model), a .gguf file or a registered
                  name such as 'smollm2' (rlhi/models/sources.py), generated with
                  rlhi's sampler in this process. The backend lives in
                  rlhi/local_backend.py (this package never imports jax-side code);
                  importing that module registers it.
  tokenizer       'local': tokenizer name or directory; '' = the checkpoint's own.
  local_batch_size  'local': rows generated together.

Cache: with `cache_path`, a SQLite file (WAL) wraps the backend. The cache key is the
sha256 of the canonical JSON of (backend, base_url, model, messages, temperature, top_p,
max_tokens, json_mode, seed, extra_body, and the JSON schema and structured_output when
'json_schema' sends one); `ChatRequest.key` is not part of it, so the
same prompt asked by two stages is paid once. Only successful answers are stored, each
as soon as it arrives, so a re-run or a run resumed after a crash sends no request that
already succeeded. Identical requests in one batch are sent once. The file holds hashes,
answers and token counts only: no key, no header, no prompt. Because equal requests
share one answer, draw several samples of one prompt by giving each a different `seed`.
The reference backend answers by item key, so its entries are keyed by (sha256 of the
annotations file, `ChatRequest.key`) instead: an edited file is never served stale.
Keep the cache on a local disk (SQLite locking is unreliable on network filesystems).

Backends: subclass `InferenceClient`, set `name` and `kind`, implement `_answer` (call
`on_result(i, result)` once per request, from any thread, as each finishes) and
`cache_identity`; then add the kind to `BACKENDS` and `make_client` (factory.py), or,
for a backend that needs jax, define it outside this package and `register_backend` it.

Modules: `base` (ChatRequest, ChatResult, InferenceClient, the SQLite ResponseCache
and CachedClient), `openai` (the OpenAI-compatible HTTP backend and its config
checks), `reference` (hand-written annotations), `factory` (default_config,
register_backend, make_client). This package re-exports their public names.

This package is part of the lightweight data package: it never imports jax.
"""

from rlhi.data.client.base import cache_key
from rlhi.data.client.base import CachedClient
from rlhi.data.client.base import ChatRequest
from rlhi.data.client.base import ChatResult
from rlhi.data.client.base import InferenceClient
from rlhi.data.client.base import OnResult
from rlhi.data.client.base import ResponseCache
from rlhi.data.client.base import STAT_KEYS
from rlhi.data.client.factory import BACKENDS
from rlhi.data.client.factory import default_config
from rlhi.data.client.factory import make_client
from rlhi.data.client.factory import register_backend
from rlhi.data.client.openai import base_urls
from rlhi.data.client.openai import OpenAIClient
from rlhi.data.client.openai import STRUCTURED_OUTPUTS
from rlhi.data.client.reference import DEFAULT_REFERENCE_PATH
from rlhi.data.client.reference import load_reference_annotations
from rlhi.data.client.reference import ReferenceClient
