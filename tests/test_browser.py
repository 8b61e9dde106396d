"""usereval.html in a real browser: headless Chromium opens the page from disk.

The expectations (items, turn types, verdicts) are computed here from the run's own
files, apart from rlhi.eval.browser. Chromium comes from Debian's `chromium` package
(.ci/run installs it); without it these tests are skipped with that reason.
"""

import hashlib
import html.parser
import json
import os
import shutil
import subprocess

import pytest

from configs import eval as eval_config
from rlhi.data import items as items_lib
from rlhi.eval import browser
from rlhi.eval import usereval
from rlhi.testing.openai_server import OpenAIServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine: `apt-get install chromium` "
    "(.ci/run installs it)")

SCRIPT_ANSWER = ("<script>document.title = 'pwned'</script><b>bold</b> & "
                 "<img src=x onerror=\"document.title='pwned'\">")


def _judge(body):
  """Deterministic verdicts that vary by item and order (so some orders disagree)."""
  prompt = body["messages"][0]["content"]
  h = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
  choice = ("A", "B", "tie")[h % 3]
  return json.dumps({"personalization": choice, "instruction_following": choice,
                     "overall": choice, "rationale": f"scripted <i>{h % 97}</i>"})


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
  """A UserEval run (original answers vs an answers file, LLM judge on loopback)."""
  tmp = tmp_path_factory.mktemp("browser")
  its = items_lib.load_items(data_dir, max_items=10).items
  answers = tmp / "answers.jsonl"
  with open(answers, "w", encoding="utf-8") as f:
    for k, it in enumerate(its):
      text = SCRIPT_ANSWER if k == 0 else f"Answer {k}: short and to the point."
      f.write(json.dumps({"item_id": it.item_id, "text": text}) + "\n")
  cfg = eval_config.get_config("b=answers,max_items=10")
  cfg.data.dir, cfg.systems.b.path, cfg.n_boot = data_dir, str(answers), 100
  with OpenAIServer(_judge) as server:
    c = cfg.judge.client
    c.base_url, c.model, c.max_retries, c.timeout_s = server.base_url, "judge", 1, 10.0
    usereval.run_usereval(cfg, str(tmp / "run"))
  return tmp / "run"


def _jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _expected(run):
  """{item_id: (turn_type, verdict)} from the run's files, computed independently."""
  points = {"b": 1.0, "tie": 0.5, "a": 0.0}
  overall = {}
  for j in _jsonl(run / usereval.JUDGEMENTS_FILE):
    overall.setdefault(j["item_id"], []).append((j["winners"] or {}).get("overall"))
  out = {}
  for it in _jsonl(run / usereval.ITEMS_FILE):
    ws = overall.get(it["item_id"], [])
    if len(ws) != 2 or any(w not in points for w in ws):
      verdict = "failed"
    else:
      s = sum(points[w] for w in ws) / 2
      verdict = "b" if s > 0.5 else "a" if s < 0.5 else "tie"
    out[it["item_id"]] = (it["turn_type"], verdict)
  return out


class _Items(html.parser.HTMLParser):
  """Collects <section class="item"> elements: their data-* attributes and hidden."""

  def __init__(self):
    super().__init__()
    self.sections, self.title, self._in_title, self.bold = [], "", False, 0

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    if tag == "section" and "item" in (a.get("class") or "").split():
      self.sections.append(a)
    if tag == "title":
      self._in_title = True
    if tag in ("b", "img", "i"):
      self.bold += 1

  def handle_endtag(self, tag):
    if tag == "title":
      self._in_title = False

  def handle_data(self, data):
    if self._in_title:
      self.title += data


def _open(page, tmp_path, fragment="", screenshot=None):
  """The DOM after the page's script ran, as headless Chromium serializes it."""
  args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
          "--no-first-run", "--disable-background-networking",
          "--disable-component-update", "--disable-sync",
          f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1400"]
  args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
  run = subprocess.run(args + [f"file://{page}#{fragment}"], capture_output=True,
                       text=True, timeout=120, check=False)
  assert run.returncode == 0, run.stderr[-2000:]
  if screenshot:
    return None
  parser = _Items()
  parser.feed(run.stdout)
  assert parser.sections, run.stdout[:2000]
  return run.stdout, parser


def test_the_page_lists_every_item_and_filters_hide_the_right_ones(run_dir, tmp_path):
  page = run_dir / browser.HTML_FILE
  expected = _expected(run_dir)
  dom, p = _open(page, tmp_path)
  assert [s["data-item"] for s in p.sections] == list(expected)
  assert not any("hidden" in s for s in p.sections)
  assert f"showing {len(expected)} of {len(expected)} items" in dom
  assert {s["data-item"]: (s["data-turn"], s["data-verdict"]) for s in p.sections
          } == expected

  for fragment, keep in [
      ("turn=follow_up", lambda t, v: t == "follow_up"),
      ("verdict=b", lambda t, v: v == "b"),
      ("turn=initial&verdict=tie", lambda t, v: t == "initial" and v == "tie")]:
    _, p = _open(page, tmp_path, fragment)
    shown = [s["data-item"] for s in p.sections if "hidden" not in s]
    assert shown == [i for i, (t, v) in expected.items() if keep(t, v)], fragment

  # Search runs over all the text, answers included.
  _, p = _open(page, tmp_path, "q=Answer%203%3A")
  assert [s["data-item"] for s in p.sections if "hidden" not in s] == [
      list(expected)[3]]


def test_markup_in_answers_and_rationales_is_shown_as_text(run_dir, tmp_path):
  dom, p = _open(run_dir / browser.HTML_FILE, tmp_path)
  assert p.title == "UserEval browser"  # the answer's script never ran
  assert p.bold == 0  # no <b>, <img> or <i> element came from data
  assert ("&lt;script&gt;document.title = 'pwned'&lt;/script&gt;&lt;b&gt;bold&lt;/b&gt; "
          "&amp; &lt;img src=x") in dom
  assert "scripted &lt;i&gt;" in dom
  # In the file itself the embedded JSON holds no '<' that could end its script.
  source = (run_dir / browser.HTML_FILE).read_text(encoding="utf-8")
  data = source.split('type="application/json">', 1)[1].split("</script>", 1)[0]
  assert "<" not in data and "\\u003cscript>" in data


def test_screenshot(run_dir, tmp_path):
  shot = tmp_path / "usereval_browser.png"
  _open(run_dir / browser.HTML_FILE, tmp_path, screenshot=shot)
  assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
  out = os.environ.get("RLHI_BROWSER_SCREENSHOT")
  if out:  # docs/usereval_browser.png is made this way
    shutil.copyfile(shot, out)
