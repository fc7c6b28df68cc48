"""Text in: the user's files, folders, globs and hub datasets, the built-in corpus, and their tokens
packed into blocks with a seeded split and order.

Imports hub (offline mode for hub datasets) and nothing above it: training and evaluation (bench
prompts) both read text through it.
"""
