"""The contract's JSON error shape, checked the same way by every API test."""


def assert_error(answer, status: int, field: str | None = None) -> dict:
    """The answer is ``status`` with the contract's error shape; ``field`` named where given."""
    assert answer.status_code == status, answer.content
    assert answer["Content-Type"].startswith("application/json")
    body = answer.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) <= {"code", "message", "field"}, error
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    if field is not None:
        assert error.get("field") == field, error
        assert field in error["message"], error
    return error
