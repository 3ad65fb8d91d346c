"""pagedbatch: offline batch inference with a paged-attention engine.

Names are imported lazily so that ``import pagedbatch.config`` (the CLI,
the job runner's argument parsing) does not pay for torch and transformers.
"""
__version__ = "0.1.0"
__all__ = ["InferenceEngine", "EngineConfig", "SamplingParams", "RequestOutput", "generate_dataset"]

_WHERE = {
    "InferenceEngine": ".api",
    "EngineConfig": ".config",
    "SamplingParams": ".sampling_params",
    "RequestOutput": ".engine.outputs",
    "generate_dataset": ".jobs.dataset_api",
}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module 'pagedbatch' has no attribute {name!r}")
