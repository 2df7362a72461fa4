"""Checkpoints of the reference implementation: from_pretrained, --init_checkpoint and the converter load them fully
(control tokens write_st/read_st, write LoRA under peft's get_peft_model wrapper), and refuse one that does not fit."""
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM

import convert_reference_checkpoint
import training_checkpoints
from grad_memgpt import GradMemGPT
from test_grad_memgpt import CONTEXT, LABELS, QUERY, tiny_backbone, tiny_model

OPTIONS = dict(n_ctrl_tokens=2, use_write_head=True, mem_proj_mode="proj", use_write_lora=True, write_lora_r=2)
TOKENIZER = "tokenizers/kv_alphabet_62"


def peft_backbone_names(model: GradMemGPT) -> dict:
    """Our backbone tensor name -> the name under peft's get_peft_model wrapper (as the reference's `self.model`)."""
    config = model.config
    lm = AutoModelForCausalLM.from_config(model.model.config)
    targets = sorted({n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n in model.state_dict() if ".lora_A." in n})
    wrapped = get_peft_model(lm, LoraConfig(r=config.write_lora_r, lora_alpha=config.write_lora_alpha,
                                            target_modules=targets, task_type="CAUSAL_LM"))
    names = {}
    for name in wrapped.state_dict():
        assert name.startswith("base_model.model.")
        names["model." + name[len("base_model.model."):]] = "model." + name
    return names


def write_reference_checkpoint(model: GradMemGPT, folder) -> None:
    """`model` saved as the reference saves it: config.json (same option names) and model.safetensors with its names
    (write_st/read_st; backbone under peft's wrapper when write LoRA is on), a tied LM head stored once."""
    backbone = peft_backbone_names(model) if model.config.use_write_lora else {}
    renamed = {"write_start": "write_st", "read_start": "read_st", **backbone}
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # tied weights: safetensors stores one
            continue
        seen.add(tensor.data_ptr())
        tensors[renamed.get(name, name)] = tensor.contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def logits(model, context=CONTEXT, query=QUERY):
    model.eval()
    with torch.no_grad():
        return model(context, query, LABELS).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_from_pretrained_and_converter_load_reference_checkpoints_fully(tmp_path, arch):
    model = tiny_model(arch, dtype=torch.float32, **OPTIONS)
    write_reference_checkpoint(model, tmp_path / "ref")
    names = set(load_file(str(tmp_path / "ref" / "model.safetensors")))
    assert {"write_st", "read_st"} <= names and any(n.startswith("model.base_model.model.") for n in names)

    loaded = AutoModel.from_pretrained(tmp_path / "ref")
    assert torch.equal(logits(loaded), logits(model))

    out = convert_reference_checkpoint.main([str(tmp_path / "ref" / "model.safetensors"), str(tmp_path / "ours"),
                                             "--tokenizer", TOKENIZER])
    assert set(load_file(str(out / "model.safetensors"))) <= set(model.state_dict())  # our names
    assert (out / "tokenizer.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert (config["n_ctrl_tokens"], config["use_write_lora"], config["write_lora_r"]) == (2, True, 2)
    converted = GradMemGPT.from_pretrained(out)
    assert torch.equal(logits(converted), logits(model))


def test_init_checkpoint_loads_a_reference_checkpoint_and_names_the_options_it_needs(tmp_path):
    model = tiny_model(dtype=torch.float32, **OPTIONS)
    write_reference_checkpoint(model, tmp_path / "ref")
    same_options = tiny_model(seed=1, dtype=torch.float32, **OPTIONS)
    training_checkpoints.load_init_checkpoint(same_options, str(tmp_path / "ref"))
    assert torch.equal(logits(same_options), logits(model))

    plain = tiny_model(seed=1, dtype=torch.float32, use_write_head=True, mem_proj_mode="proj")
    with pytest.raises(ValueError, match=r"unused \(e\.g\. .*lora_A.*written with --n_ctrl_tokens 2 --use_write_lora "
                                         r"true --write_lora_r 2 .*--init_checkpoint_partial"):
        training_checkpoints.load_init_checkpoint(plain, str(tmp_path / "ref"))


def test_a_checkpoint_that_does_not_fit_its_config_is_refused(tmp_path):
    model = tiny_model(dtype=torch.float32, n_ctrl_tokens=2)
    write_reference_checkpoint(model, tmp_path / "ref")
    config = json.loads((tmp_path / "ref" / "config.json").read_text())
    (tmp_path / "ref" / "config.json").write_text(json.dumps({**config, "n_ctrl_tokens": 0}))
    with pytest.raises(ValueError, match="not used: read_end, read_start, write_end, write_start.*n_ctrl_tokens"):
        AutoModel.from_pretrained(tmp_path / "ref")
    with pytest.raises(ValueError, match="not used: read_end"):
        convert_reference_checkpoint.main([str(tmp_path / "ref"), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    # our own checkpoints are held to the same rule
    ours = tiny_model(dtype=torch.float32, use_write_head=True)
    ours.save_pretrained(tmp_path / "ours")
    weights = load_file(str(tmp_path / "ours" / "model.safetensors"))
    del weights["write_head.weight"]
    save_file(weights, str(tmp_path / "ours" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model tensors not in the checkpoint: write_head.weight"):
        AutoModel.from_pretrained(tmp_path / "ours")


def shard(folder, parts: int = 3) -> None:
    """Split the folder's model.safetensors into `parts` shards with an index, as transformers saves large models."""
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names, weight_map = sorted(tensors), {}
    for i in range(parts):
        file = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::parts]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_a_sharded_reference_checkpoint_loads_and_converts_fully(tmp_path):
    model = tiny_model(dtype=torch.float32, **OPTIONS)
    write_reference_checkpoint(model, tmp_path / "ref")
    shard(tmp_path / "ref")
    assert torch.equal(logits(AutoModel.from_pretrained(tmp_path / "ref")), logits(model))
    out = convert_reference_checkpoint.main([str(tmp_path / "ref"), str(tmp_path / "ours")])
    assert torch.equal(logits(GradMemGPT.from_pretrained(out)), logits(model))
    (tmp_path / "ref" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        AutoModel.from_pretrained(tmp_path / "ref")


def test_converter_refuses_other_folders(tmp_path):
    lm = AutoModelForCausalLM.from_config(tiny_backbone("llama"))
    lm.save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match="'llama' model"):
        convert_reference_checkpoint.main([str(tmp_path / "lm"), str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match="lacks config.json or its weights"):
        convert_reference_checkpoint.main([str(tmp_path / "missing"), str(tmp_path / "out")])


def test_evaluate_model_reads_a_converted_reference_checkpoint(tmp_path):
    import evaluate_model

    write_reference_checkpoint(tiny_model(dtype=torch.float32, n_ctrl_tokens=1), tmp_path / "ref")
    with pytest.raises(FileNotFoundError, match="no tokenizer .*convert_reference_checkpoint.py"):
        evaluate_model.load_trained_model(str(tmp_path / "ref"), device="cpu")
    convert_reference_checkpoint.main([str(tmp_path / "ref"), str(tmp_path / "ours"), "--tokenizer", TOKENIZER])
    model, tokenizer = evaluate_model.load_trained_model(str(tmp_path / "ours"), device="cpu")
    assert isinstance(model, GradMemGPT) and tokenizer.padding_side == "right"
