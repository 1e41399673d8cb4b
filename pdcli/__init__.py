"""pdcli: LLM serving with prefill/decode disaggregation. The engine (and torch) load on first use of
`LLM`, `SamplingParams` or the outputs, so `pdcli --help` answers at once."""
__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "SampleLogprob",
           "__version__"]

_LAZY = {"LLM": "pdcli.llm", "SamplingParams": "pdcli.sampling_params", "StructuredOutputsParams": "pdcli.sampling_params",
         "RequestOutput": "pdcli.outputs", "CompletionOutput": "pdcli.outputs", "SampleLogprob": "pdcli.outputs"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pdcli' has no attribute {name!r}")
