from tokens.cli import main

main()
