"""Dataset-wide attribution jobs: read a data set, batch it, attribute every row, write Parquet shards.

    for result in gim_fast.attribute_dataset("prompts.jsonl", "smollm2-135m"): ...
    gim_fast.attribute_dataset("prompts.jsonl", out="runs/capitals").run()     # shards + manifest, resumable

The same from the shell: ``gim-fast attribute --data prompts.jsonl --out runs/capitals``; with ``answer_field=`` or
``generate=`` (``--answer-field``/``--generate``) every row's answer is attributed instead of one next token.
"""
from .inputs import FORMATS, InputError, RowError
from .runner import AnswerRowResult, BadRowError, DatasetRun, RowResult, attribute_dataset
from .writer import JobError, read_results

__all__ = ["attribute_dataset", "DatasetRun", "RowResult", "AnswerRowResult", "RowError", "BadRowError", "InputError",
           "JobError", "FORMATS", "read_results"]
