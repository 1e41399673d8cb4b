"""pdcli: LLM serving with prefill/decode disaggregation."""
__version__ = "0.1.0"

from pdcli.llm import LLM  # noqa: E402
from pdcli.outputs import CompletionOutput, RequestOutput  # noqa: E402
from pdcli.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
