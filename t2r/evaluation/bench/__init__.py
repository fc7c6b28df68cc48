"""`t2r bench`: memory probes, the engines measured (teacher, converted, llama.cpp), the run that
isolates each in a child process, and the report (bars, tables, plots)."""
