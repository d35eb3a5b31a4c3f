"""The toolkit for agentic apps on a tap: ``@tool`` (a function as an OpenAI tool, its schema from its type
hints), :class:`Registry` (tools by name, plugins' included), :class:`Agent` (the loop over tool calls) and
:func:`run_batch` (many prompts under a credit cap, to Parquet, resumable). Packages add tools through the
``llama_orch.tools`` entry points (:mod:`orch.plugins`).
"""

from orch.toolkit.agent import Agent, AgentResult, ToolCall
from orch.toolkit.batch import BatchReport, arun_batch, run_batch
from orch.toolkit.tools import Registry, Tool, ToolError, tool

__all__ = [
    "Agent",
    "AgentResult",
    "BatchReport",
    "Registry",
    "Tool",
    "ToolCall",
    "ToolError",
    "arun_batch",
    "run_batch",
    "tool",
]
