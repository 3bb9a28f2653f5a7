"""The top of the house: the `convoy` command's launchers (`convoy run | api | worker | db |
token` and the client commands), wired from the layers below. Nothing imports this package."""
