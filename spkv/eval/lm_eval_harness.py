"""lm-evaluation-harness tasks on an SP-KV model (HellaSwag, ARC, PIQA, ... or a local task folder).

The model is wrapped in lm-eval's own HFLM, so prompts, few-shot handling and metrics are the
harness's. Two SP-KV specifics:
  * loglikelihood requests run the full-sequence hard-phase forward (use_cache=False). It is
    mathematically the same as prefilling through the compressed cache (tests/test_eval.py), faster,
    and lets us count the density of the gates the model used;
  * generate_until requests go through model.generate, which (eval mode, hard phase) builds the
    compressed SPKVCache by itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spkv.convert import is_converted
from spkv.density import forward_with_density


@dataclass
class HarnessConfig:
    """What to run; mirrors lm_eval.simple_evaluate's arguments of the same names."""

    tasks: list[str]
    include_path: str | None = None  # folder of extra task YAMLs (local data, custom tasks)
    limit: int | None = None  # documents per task (None: all)
    num_fewshot: int | None = None
    batch_size: int = 1  # 1 keeps the density count exact (batches are right-padded)
    max_length: int | None = None  # default: the model's max positions
    seed: int = 0
    log_samples: bool = False


def _hflm_class() -> type:
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as error:  # pragma: no cover - lm_eval is a dependency
        raise ImportError("lm-evaluation-harness is missing: pip install 'lm_eval>=0.4.9'") from error

    class SPKVLM(HFLM):
        """HFLM whose loglikelihood forwards are the full-sequence SP-KV forward, with density counted."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.kept: torch.Tensor | None = None  # [layers, Hkv] summed over loglikelihood forwards
            self.counted: torch.Tensor | None = None

        def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
            if attn_mask is not None or labels is not None or not is_converted(self.model):
                return super()._model_call(inps, attn_mask, labels)
            with torch.no_grad():
                output, kept, counted = forward_with_density(self.model, inps)
            logits = output.logits
            if inps.shape[0] == 1:  # padded batches would count padding as decided pairs
                self.kept = kept if self.kept is None else self.kept + kept
                self.counted = counted if self.counted is None else self.counted + counted
            return logits

        def density(self) -> float | None:
            """Kept / decided out-of-window pairs over all loglikelihood forwards, mean over layers x heads."""
            if self.kept is None or not bool((self.counted > 0).any()):
                return None
            per_head = self.kept / self.counted
            return float(per_head[self.counted > 0].mean())

    return SPKVLM


def wrap_model(model: torch.nn.Module, tokenizer: Any, batch_size: int = 1, max_length: int | None = None) -> Any:
    """An lm-eval LM (HFLM subclass) around an in-memory model; an SP-KV model keeps its SP-KV behaviour."""
    model.eval()
    return _hflm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                         device=str(model.device))


def task_manager(tasks: list[str], include_path: str | None) -> Any:
    """lm-eval's TaskManager; skips indexing the ~10k built-in task files (20 s) when the local folder has every task."""
    from lm_eval.tasks import TaskManager

    if include_path:
        folder = str(Path(include_path).resolve())
        local = TaskManager(include_path=folder, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
        return TaskManager(include_path=folder)
    return TaskManager()


def run_tasks(model: torch.nn.Module, tokenizer: Any, config: HarnessConfig) -> dict[str, Any]:
    """lm_eval.simple_evaluate on the model -> {"results": per-task metrics, "density", "config", ...}."""
    from lm_eval import simple_evaluate

    lm = wrap_model(model, tokenizer, config.batch_size, config.max_length)
    out = simple_evaluate(
        model=lm, tasks=list(config.tasks), num_fewshot=config.num_fewshot, limit=config.limit,
        task_manager=task_manager(config.tasks, config.include_path), log_samples=config.log_samples, random_seed=config.seed,
        numpy_random_seed=config.seed, torch_random_seed=config.seed, fewshot_random_seed=config.seed,
    )
    if out is None:  # only non-zero ranks of a distributed run get None
        return {}
    result = {
        "tasks": list(config.tasks), "results": out["results"], "n_samples": out.get("n-samples"),
        "versions": out.get("versions"), "config": {**config.__dict__},
        "spkv": {**model.spkv_config.to_dict(), "loglikelihood_density": lm.density()} if is_converted(model) else None,
        "lm_eval_version": _lm_eval_version(),
    }
    if config.log_samples:
        result["samples"] = out.get("samples")
    return result


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def results_markdown(result: dict[str, Any]) -> str:
    """One row per (task, metric): value ± stderr, plus the SP-KV settings and density."""
    lines = ["| task | metric | value | stderr |", "| --- | --- | --- | --- |"]
    for task, metrics in result["results"].items():
        for key, value in metrics.items():
            if key == "alias" or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            name, _, filt = key.partition(",")
            err = metrics.get(f"{name}_stderr,{filt}")
            err_s = f"{err:.4f}" if isinstance(err, (int, float)) else ""
            lines.append(f"| {task} | {name} ({filt}) | {value:.4f} | {err_s} |")
    spkv = result.get("spkv")
    if spkv:
        dens = spkv.get("loglikelihood_density")
        dens_s = "n/a" if dens is None else f"{100 * dens:.1f}%"
        lines += ["", f"SP-KV: threshold {spkv['threshold']}, window {spkv['window']}; density on loglikelihood requests {dens_s}."]
    return "\n".join(lines) + "\n"
