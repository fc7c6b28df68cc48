"""`t2r bench`: the records (cases), memory probes, the engines measured (teacher eager and compiled
with a static cache, converted, baseline, llama.cpp), the run that interleaves their rounds, each in
a child process, and the report (bars, like-for-like ratios, tables, plots)."""
