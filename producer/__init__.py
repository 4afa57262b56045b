"""The producer: run configuration, dataset validation, chunking, submission and the CLI.

Importing this package never imports torch, transformers or peft.
"""
