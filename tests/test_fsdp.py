"""FSDP: the decoder-layer wrap policy, the storage rule, the config overlay, and (2 GPUs) a real run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from qlora_testing import REPO, cli_args, free_port, wrap_fsdp1
from safetensors.torch import load_file

from qlora_lightning.adapters import is_adapter_key
from qlora_lightning.cli import run_lightning_cli
from qlora_lightning.fsdp import (
    QLoRAFSDPStrategy,
    check_optimizer,
    check_shardable,
    decoder_layer_policy,
    gather_adapters,
    load_adapters,
    sharding_strategy,
)
from qlora_lightning.fsdp2 import QLoRAFSDP2Strategy
from qlora_lightning.model import load_model
from qlora_lightning.specs import LoraSpec, QuantSpec


def test_policy_wraps_decoder_layers_and_frozen_bases_apart(tiny_llama_dir):
    model = load_model(
        str(tiny_llama_dir), quant=QuantSpec(compute_dtype="float32"), lora=LoraSpec(r=4), with_tokenizer=False
    ).model
    wrapped = [n for n, m in model.named_modules() if decoder_layer_policy(m, recurse=False, nonwrapped_numel=0)]
    layers = [n for n in wrapped if n.count(".") == 2]
    assert layers == ["model.layers.0", "model.layers.1"]
    bases = [n for n in wrapped if n not in layers]
    assert len(bases) == 2 * 7 and all(n.endswith(".base_layer") for n in bases)  # the head stays with the root
    assert decoder_layer_policy(model, recurse=True, nonwrapped_numel=0)  # always look inside


def _wrap_fsdp1(deferred, forward_prefetch: bool, cpu_offload: bool):
    """FSDP1 around a meta-device model loaded unit by unit: (model, gather, load, whole gradients, frozen
    parameters that got gradient buffers, shard units)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    wrapped = wrap_fsdp1(deferred, forward_prefetch)

    def grads():
        with FSDP.summon_full_params(wrapped, writeback=False, with_grads=True):
            return {
                k.replace("_fsdp_wrapped_module.", ""): p.grad.clone()
                for k, p in wrapped.named_parameters()
                if p.requires_grad and p.grad is not None
            }

    def frozen_with_grads():
        return [
            n
            for n, m in wrapped.named_modules()
            if isinstance(m, FSDP)
            and m._handle is not None
            and not m._handle.flat_param.requires_grad
            and m._handle.flat_param.grad is not None
        ]

    def step():
        _adamw([p for p in wrapped.parameters() if p.requires_grad]).step()

    units = sum(isinstance(m, FSDP) for m in wrapped.modules())
    return wrapped, gather_adapters, load_adapters, grads, frozen_with_grads, step, units


def _wrap_fsdp2(deferred, forward_prefetch: bool, cpu_offload: bool):
    """FSDP2 (`fsdp2.shard_model`) around a meta-device model, as `_wrap_fsdp1`."""
    from torch.distributed.fsdp import FSDPModule

    from qlora_lightning import fsdp2

    model = deferred.model
    fsdp2.shard_model(model, deferred.materialize, cpu_offload=cpu_offload, forward_prefetch=forward_prefetch)

    def grads():
        return {k: p.grad.full_tensor() for k, p in model.named_parameters() if p.grad is not None}

    def frozen_with_grads():
        return [k for k, p in model.named_parameters() if not p.requires_grad and p.grad is not None]

    def step():  # as QLoRAFSDP2Strategy runs it: the optimizer steps each rank's shards as plain tensors
        optimizer = _adamw([p for p in model.parameters() if p.requires_grad])
        fsdp2._LocalShards(optimizer).bind_grads()
        optimizer.step()

    units = sum(isinstance(m, FSDPModule) for m in model.modules())
    return model, fsdp2.gather_adapters, fsdp2.load_adapters, grads, frozen_with_grads, step, units


WRAPS = {"fsdp1": _wrap_fsdp1, "fsdp2": _wrap_fsdp2}


def _adamw(params):
    """The recipe's optimizer (bitsandbytes' paged AdamW 32-bit, one launch a step), with a step large enough to
    compare."""
    from qlora_lightning.optim import PagedAdamW32bitOneSync

    return PagedAdamW32bitOneSync(params, lr=1e-2)


def _fsdp_rank(rank: int, folder: str, port: int, results, strategy: str, forward_prefetch: bool, cpu_offload: bool):
    """One of 2 CPU processes: FSDP (FULL_SHARD, gloo) against the unwrapped model on the same batch."""
    import os

    import torch.distributed as dist

    from qlora_lightning.adapters import adapter_state_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    quant = QuantSpec(compute_dtype="float32", quant_storage="float32")
    model = load_model(folder, quant=quant, lora=LoraSpec(r=4, dropout=0.0), with_tokenizer=False).model
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    ref_loss = model(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    ref = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    _adamw([p for p in model.parameters() if p.requires_grad]).step()
    ref_stepped = adapter_state_dict(model)

    # The production path: the model left on the meta device and loaded unit by unit as FSDP shards it.
    deferred = load_model(folder, quant=quant, lora=LoraSpec(r=4, dropout=0.0), with_tokenizer=False, materialize=False)
    wrapped, gather, load, grads, frozen_with_grads, step, units = WRAPS[strategy](
        deferred, forward_prefetch, cpu_offload
    )
    load(wrapped, ref)
    loss = wrapped(input_ids=ids, labels=ids).loss
    loss.backward()
    frozen_units_with_grads = frozen_with_grads()
    got = grads()
    step()
    stepped = gather(wrapped, rank)
    fresh = {k: torch.full_like(v, 0.5) for k, v in ref.items()}
    load(wrapped, fresh)
    reloaded = gather(wrapped, rank)
    if rank == 0:
        results.put(
            {
                "loss": (loss.item(), ref_loss.item()),
                "frozen_units_with_grads": frozen_units_with_grads,
                "stepped": stepped.keys() == ref.keys()
                and all(torch.allclose(stepped[k], ref_stepped[k], atol=1e-5) for k in ref),
                "reloaded": reloaded.keys() == ref.keys() and all(torch.equal(reloaded[k], fresh[k]) for k in ref),
                "grads_close": got.keys() == ref_grads.keys()
                and all(torch.allclose(got[k], ref_grads[k], atol=1e-6) for k in got),
                "units": units,
            }
        )
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "strategy, forward_prefetch, cpu_offload, units",
    [
        ("fsdp1", False, False, 1 + 2 + 2 * 7),  # the root, 2 decoder layers, each layer's 7 frozen bases
        ("fsdp1", True, False, 1 + 2 + 2 * 7),
        ("fsdp2", False, False, 1 + 2),  # the root and one unit per decoder layer
        ("fsdp2", True, False, 1 + 2),
        ("fsdp2", True, True, 1 + 2),
    ],
    ids=["fsdp1", "fsdp1-prefetch", "fsdp2", "fsdp2-prefetch", "fsdp2-prefetch-offload"],
)
def test_fsdp_on_two_cpu_processes_trains_and_moves_adapters_in_and_out(
    tiny_llama_dir, strategy, forward_prefetch, cpu_offload, units
):
    """Sharded (2 gloo ranks), loaded unit by unit from the meta device: same loss and gradients as the
    model loaded whole and unwrapped, no gradient buffers for frozen units, the same adapters after a step of
    the recipe's optimizer (gathered on rank 0), and adapters loaded into the shards exactly; with and without forward prefetch (the strategies' default),
    and FSDP2 with its CPU offload."""
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    torch.multiprocessing.start_processes(
        _fsdp_rank,
        args=(str(tiny_llama_dir), port, results, strategy, forward_prefetch, cpu_offload),
        nprocs=2,
        start_method="spawn",
    )
    r = results.get(timeout=120)  # the ranks have exited: the result is there unless a rank failed
    assert r["loss"][0] == pytest.approx(r["loss"][1], rel=1e-6)
    assert r["units"] == units and r["frozen_units_with_grads"] == []
    assert r["grads_close"] and r["stepped"] and r["reloaded"]


def test_packed_weights_must_be_stored_in_the_compute_dtype():
    with pytest.raises(ValueError, match="quant_storage to 'bfloat16'"):
        check_shardable(QuantSpec())  # uint8 storage: FSDP cannot flatten it with bf16 LoRA weights
    check_shardable(QuantSpec(quant_storage="bfloat16"))
    check_shardable(QuantSpec(quantize="none"))


@pytest.mark.parametrize(
    "strategy, settings, message",
    [
        (FSDPStrategy(), {}, "use qlora_lightning.fsdp.QLoRAFSDPStrategy for FSDP"),
        (QLoRAFSDPStrategy(), {"compile_layers": True}, "model.compile_layers and model.offload_activations"),
        (QLoRAFSDPStrategy(), {"offload_activations": True}, "model.compile_layers and model.offload_activations"),
        (ModelParallelStrategy(), {}, "use qlora_lightning.fsdp2.QLoRAFSDP2Strategy for FSDP2"),
        (QLoRAFSDP2Strategy(), {"offload_activations": True}, "model.offload_activations is not supported under FSDP2"),
    ],
    ids=["lightnings-own-fsdp", "compiled", "offloaded", "lightnings-own-model-parallel", "fsdp2-offloaded"],
)
def test_settings_fsdp_cannot_shard_are_refused_before_the_model_loads(strategy, settings, message):
    shardable = QuantSpec(quant_storage="bfloat16")
    with pytest.raises(ValueError, match=message):
        sharding_strategy(strategy, shardable, **{"compile_layers": False, "offload_activations": False, **settings})
    with pytest.raises(ValueError, match="quant_storage to 'bfloat16'"):
        sharding_strategy(QLoRAFSDPStrategy(), QuantSpec(), compile_layers=False, offload_activations=False)
    assert sharding_strategy(None, QuantSpec(), compile_layers=True, offload_activations=True) is None


def _70b_with(overlay: str, tmp_path):
    """The README's FSDP line parsed (not run): 70b.yaml with the `overlay` strategy config, the optimizer states on
    the GPUs (70b.yaml keeps them on the host for one GPU)."""
    configs = ["--config", str(REPO / "configs" / "70b.yaml"), "--config", str(REPO / "configs" / overlay)]
    return run_lightning_cli(
        [*configs, "--model.optimizer.init_args.states_on_host", "false", "--trainer.accelerator", "cpu"]
        + ["--trainer.default_root_dir", str(tmp_path)],
        run=False,
    )


def test_fsdp_overlay_parses_into_the_strategy(tmp_path, monkeypatch):
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

    # Lightning refuses FSDP without a GPU when the trainer is built; this test only checks the parse.
    monkeypatch.setattr(_AcceleratorConnector, "_check_strategy_and_fallback", lambda self: None)
    cli = _70b_with("fsdp.yaml", tmp_path)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, QLoRAFSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"] is decoder_layer_policy and strategy.kwargs["use_orig_params"]
    assert strategy.kwargs["forward_prefetch"]
    assert cli.model.quant.quant_storage == cli.model.quant.compute_dtype == "bfloat16"
    assert not cli.model.compile_layers
    assert cli.model.lora.r == 64  # the 70B recipe itself is untouched
    optimizer = cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(2))])
    assert not optimizer.states_on_host and optimizer.defaults["lr"] == 1e-4
    check_optimizer(optimizer)  # what FSDP can checkpoint


def test_fsdp2_overlay_parses_into_the_strategy(tmp_path):
    cli = _70b_with("fsdp2.yaml", tmp_path)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, QLoRAFSDP2Strategy) and not strategy.cpu_offload and strategy.forward_prefetch
    assert not cli.model.offload_activations
    assert cli.model.lora.r == 64 and cli.model.quant == QuantSpec()  # the 70B recipe itself is untouched
    check_optimizer(cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(2))]))  # what FSDP2 can checkpoint


def fsdp_save_then_resume(base, tmp_path, script, config: str, first: int = 2, then: int = 1, **device) -> None:
    """FSDP (`configs/<config>`) on `first` processes to step 4 (checkpoints every 2), then resume `last` on `then`
    processes at the same global batch (4: micro-batch 2 × accumulation 4 / processes) to step 6; checks the files
    and the adapters along the way."""
    fsdp = dict(config=REPO / "configs" / config, **device)

    def args(processes, **extra):
        accumulate = {"trainer__accumulate_grad_batches": 2 // processes}
        return [sys.executable, str(script)] + cli_args(
            base, tmp_path, **extra, trainer__devices=processes, **accumulate, **fsdp
        )[2:]

    done = subprocess.run(args(first, max_steps=4, every=2), capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["last", "last.ckpt", "step=2", "step=2.ckpt", "step=4", "step=4.ckpt"]
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["state_dict"] and all(is_adapter_key(k) for k in state["state_dict"])
    # paged AdamW's moments, gathered whole: one per adapter tensor element (bitsandbytes hides them from FSDP)
    optimizer_state = state["optimizer_states"][0]["state"]
    moments = [v["state1"] for v in optimizer_state.values()]
    assert sorted(m.shape for m in moments) == sorted(v.shape for v in state["state_dict"].values())
    assert sorted(optimizer_state) == list(range(len(state["state_dict"])))  # the optimizer's own order, as DDP's
    assert not any(torch.equal(v["state1"], v["state2"]) for v in optimizer_state.values())  # two moments, not one
    last_adapter = load_file(tmp_path / "checkpoints" / "last" / "adapter_model.safetensors")
    (final,) = tmp_path.glob("lightning_logs/version_*/adapter/adapter_model.safetensors")
    final_adapter = load_file(final)  # written at the end of fit from the adapters gathered over both ranks
    assert final_adapter.keys() == last_adapter.keys()
    assert all(torch.equal(final_adapter[k], last_adapter[k]) for k in last_adapter)

    resumed_run = subprocess.run(
        args(then, max_steps=6, every=2) + ["--ckpt_path", "last"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert resumed_run.returncode == 0, resumed_run.stderr[-3000:]
    assert "Restored all states" in resumed_run.stderr + resumed_run.stdout
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 6
    moved = [k for k in state["state_dict"] if not torch.equal(state["state_dict"][k], resumed["state_dict"][k])]
    assert moved, "the adapters did not train after the resume"
    assert all(torch.isfinite(v).all() for v in resumed["state_dict"].values())
    moments = resumed["optimizer_states"][0]["state"].values()
    assert sorted(m["state1"].shape for m in moments) == sorted(v.shape for v in resumed["state_dict"].values())


@pytest.mark.slow
@pytest.mark.parametrize(
    "optimizer, said",
    [
        ({}, "PagedAdamW8bit: 8-bit optimizer states cannot be gathered by FSDP"),
        ({"model__optimizer__states_on_host": "true"}, "PagedAdamW32bitOneSync(states_on_host=True) is not supported"),
    ],
)
def test_an_optimizer_fsdp_cannot_checkpoint_is_a_clear_error_before_training(
    tiny_chat_llama_dir, tmp_path, optimizer, said
):
    args = cli_args(
        tiny_chat_llama_dir,
        tmp_path,
        max_steps=1,
        every=1,
        trainer__devices=1,
        config=REPO / "configs" / "fsdp.yaml",
        model__quant__quant_storage="float32",
        model__optimizer=(
            "qlora_lightning.optim.PagedAdamW32bitOneSync" if optimizer else "bitsandbytes.optim.PagedAdamW8bit"
        ),
        **optimizer,
    )
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "fsdp_cpu_train.py")] + args[2:],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode != 0
    assert said in done.stderr
    assert not list(tmp_path.rglob("*.ckpt")) and "train/loss" not in done.stdout + done.stderr  # before any step


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, first, then, settings",
    [
        ("fsdp.yaml", 2, 1, {}),
        ("fsdp2.yaml", 2, 1, {"model__compile_layers": "true"}),
        ("fsdp2.yaml", 1, 2, {"trainer__strategy__init_args__cpu_offload": "true"}),
    ],
    ids=["fsdp1-2-to-1", "fsdp2-compiled-2-to-1", "fsdp2-offload-1-to-2"],
)
def test_fsdp_on_two_cpu_processes_saves_adapters_once_and_resumes_on_one(
    tiny_chat_llama_dir, tmp_path, config, first, then, settings
):
    """FSDP1 and FSDP2 through the CLI on CPU processes: saved on 2 and resumed on 1 (FSDP2 with compiled decoder
    layers), and FSDP2 with its CPU offload saved on 1 and resumed on 2."""
    fsdp_save_then_resume(
        tiny_chat_llama_dir,
        tmp_path,
        REPO / "tests" / "fsdp_cpu_train.py",
        config,
        first,
        then,
        model__quant__quant_storage="float32",
        **settings,
    )


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("config", ["fsdp.yaml", "fsdp2.yaml"])
@pytest.mark.parametrize("cpu_offload", [False, True])
def test_fsdp_on_two_gpus_saves_adapters_once_and_resumes_on_one(tiny_chat_llama_dir, tmp_path, config, cpu_offload):
    fsdp_save_then_resume(
        tiny_chat_llama_dir,
        tmp_path,
        REPO / "train.py",
        config,
        trainer__accelerator="cuda",
        trainer__precision="bf16-true",
        model__quant__compute_dtype="bfloat16",
        trainer__strategy__init_args__cpu_offload=cpu_offload,
    )


def test_gathering_adapters_of_a_model_fsdp2_did_not_shard_names_the_parameter():
    """`fsdp2.gather_adapters` on a model `shard_model` did not shard (research code calling it on the wrong model)
    names the first adapter and what it expected, before any collective is started."""
    from qlora_lightning import fsdp2
    from qlora_lightning.lora import LoraLinear4bit

    model = torch.nn.Sequential(LoraLinear4bit.from_weight(torch.randn(16, 16, dtype=torch.bfloat16), device="cpu"))
    with pytest.raises(TypeError, match=r"0\.lora_A: expected a parameter sharded by `shard_model`, got a Parameter"):
        fsdp2.gather_adapters(model, rank=0)
