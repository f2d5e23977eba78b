from tokens.cli import main

if __name__ == "__main__":  # not again in a spawned child process, which imports this module
    main()
