"""Circuit discovery on Hugging Face models: edge and node attribution patching under GIM (default), plain EAP and
EAP-IG, and the MIB benchmark's circuit-track faithfulness (CPR, CMD).

    from gim_fast import circuits
    task = circuits.ioi(tokenizer, n=32)                           # clean/corrupt prompt pairs and the metric
    scores = circuits.attribute(model, task, "gim")               # Scores: .edges [nodes, inputs], .nodes
    result = circuits.faithfulness(model, task, [scores], levels=("edge", "node"))
    for curve in result.curves: print(curve.method, curve.level, curve.cpr, curve.cmd)

Modules: ``graph`` (nodes, inputs, edges, circuits), ``layout`` (where they live in each model family), ``tasks``,
``attribution`` (scores), ``patching`` (running a circuit), ``faithfulness`` (MIB metrics), ``memory``
(the estimate), ``run`` (the whole experiment), ``report`` and ``cli`` (``gim-fast circuit``).
"""
from .attribution import DEFAULT_IG_STEPS, METHODS, Scores, attribute
from .faithfulness import Curve, Faithfulness, area, faithfulness, spearman
from .graph import PERCENTAGES, Graph
from .memory import CircuitMemoryEstimate, check_circuit_memory, estimate_circuit_memory
from .patching import circuit_metric, edge_effects, run_circuit
from .run import CircuitResult, discover
from .tasks import (Task, TaskNotPerformedError, TaskPerformance, capitals, from_jsonl, greater_than, ioi, load_task,
                    performance)

__all__ = ["Graph", "PERCENTAGES", "Task", "TaskPerformance", "TaskNotPerformedError", "ioi", "greater_than",
           "capitals", "from_jsonl", "load_task", "performance", "attribute", "Scores", "METHODS",
           "DEFAULT_IG_STEPS", "faithfulness", "Faithfulness", "Curve", "area", "spearman", "circuit_metric",
           "run_circuit", "edge_effects", "estimate_circuit_memory", "check_circuit_memory",
           "CircuitMemoryEstimate", "discover", "CircuitResult"]
