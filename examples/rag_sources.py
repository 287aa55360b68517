"""Which retrieved documents did the answer come from? GIM over a small RAG prompt with SmolLM2-135M-Instruct.

    .venv/bin/python examples/rag_sources.py            # prints the tables, writes sources.html
"""
import pandas as pd

import gim_fast
from gim_fast.models import load_pretrained

model, tokenizer = load_pretrained("smollm2-135m")
documents = [
    "The Eiffel Tower was completed in 1889 for the World's Fair in Paris.",
    "Lima was founded by Francisco Pizarro in 1535.",
    "Mount Everest is the highest mountain above sea level.",
    "The capital of Peru is Lima.",
    "The Amazon is the largest rainforest on Earth.",
]
# the prompt: the tokenizer's chat template around "Context: {documents}\n\nQuery: {query}"; the answer: generated
# greedily, here up to the first line break (keywords other than gim_fast's go to model.generate)
table = gim_fast.attribute_context(model, tokenizer, documents, "What is the capital of Peru?",
                                   stop_strings=["\n"])

pd.set_option("display.width", 120)
print(f"answer: {table.answer!r}\n")
print(table.sort_values("score", ascending=False)[["source", "score", "rank"]].to_string(), "\n")
print(table.rest.to_string(), "\n")                 # the query, the template and markup, earlier answer tokens
print(table.per_token(k=2).to_string(), "\n")       # per answer token: its two highest-scored documents
table.save_html("sources.html")                     # the documents × answer-tokens heatmap; point at a token
