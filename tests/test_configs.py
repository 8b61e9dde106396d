"""Config argument parsing and every config file's variants."""

import pytest

from configs import common
from configs import data_prep
from configs import dpo
from configs import reward_model
from configs import sft
from rlhi.models import builder


def test_parse_arg_types_and_errors():
  a = common.parse_arg("sample,min_turns=3,name=x", sample=False, min_turns=1, name="y",
                       lr=1e-3)
  assert (a.sample, a.min_turns, a.name, a.lr) == (True, 3, "x", 1e-3)
  assert common.parse_arg("flag=false", flag=True).flag is False
  with pytest.raises(ValueError, match="unknown config arg 'mni_turns'.*known: min_turns"):
    common.parse_arg("mni_turns=2", min_turns=1)
  with pytest.raises(ValueError, match="expected int, got 'two'"):
    common.parse_arg("min_turns=two", min_turns=1)
  with pytest.raises(ValueError, match="needs a value"):
    common.parse_arg("min_turns", min_turns=1)


def test_model_size_variants():
  assert common.parse_model_arg(None)[1] == "tiny"
  assert common.parse_model_arg("llama3_8b")[1] == "llama3_8b"
  with pytest.raises(ValueError, match="several model sizes"):
    common.parse_model_arg("tiny,small")


def test_config_files_build():
  assert data_prep.get_config("sample").client.backend == "reference"
  assert data_prep.get_config("user_agent").ingest.user_key == ("hashed_ip", "user_agent")
  rm = reward_model.get_config("llama3_8b,no_persona,steps=7")
  assert (rm.model.name, rm.data.with_persona, rm.total_steps) == ("llama3_8b", False, 7)
  assert rm.model.remat_policy == "full"
  assert sft.get_config("small").model.name == "small"


def test_model_overrides():
  assert builder.parse_overrides("num_layers=2, dtype=bfloat16") == {
      "num_layers": 2, "dtype": "bfloat16"}
  with pytest.raises(ValueError, match="LlamaConfig field"):
    builder.parse_overrides("num_layer=2")


def test_smollm2_size_starts_from_the_released_weights():
  # A released size trains from its own weights and tokenizer unless told otherwise.
  for module, arg in ((sft, "smollm2"), (reward_model, "smollm2"),
                      (dpo, "rewrites,smollm2")):
    cfg = module.get_config(arg)
    assert cfg.model.init == "smollm2" and cfg.tokenizer == "", module
  assert sft.get_config("tiny").model.init == ""


def test_sft_on_rewrites_learns_exactly_the_chosen_answers(data_dir):
  # pylint: disable=g-import-not-at-top
  from rlhi.data import files
  from rlhi.data import schema
  from rlhi.models import tokenizer as tok_lib
  from rlhi.train import sft as sft_train
  cfg = sft.get_config("tiny,rewrites")
  cfg.data.dir = data_dir
  cfg.data.max_length, cfg.data.max_response_length = 4096, 2048
  tok = tok_lib.load_tokenizer("bundled")
  fmt = tok_lib.ChatFormatter(tok, cfg.data.system_template)
  pairs = schema.read_jsonl(f"{data_dir}/{files.PAIRS.format(split='train')}",
                            schema.PreferencePair)
  examples, stats = sft_train.load_examples(cfg, fmt, ("train",))
  assert len(examples) == len(pairs) > 0 and stats.num_dropped == 0
  for ex, pair in zip(examples, pairs):
    target = ex["tokens"][ex["loss_mask"] == 1]
    # The chosen answer and the end-of-turn token(s), nothing of the prompt.
    assert tok.decode(target.tolist(), skip_special_tokens=True).strip() == \
        pair.chosen.strip()
    assert pair.persona.splitlines()[0] in tok.decode(ex["tokens"].tolist())
