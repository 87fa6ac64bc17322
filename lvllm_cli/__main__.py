from lvllm_cli.cli import main

main()
