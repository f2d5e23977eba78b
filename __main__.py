from tokens.cli import app

app(prog_name="tokens")
