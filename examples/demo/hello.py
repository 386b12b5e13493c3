"""demo/hello: the smallest endpoint. The JSON attribute ``name`` fills the parameter ``name``."""


def hello(name="world"):
    return {"greeting": f"Hello, {name}!"}
