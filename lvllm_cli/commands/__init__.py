"""One module per `lvllm` sub-command; see lvllm_cli/cli.py for the contract."""
