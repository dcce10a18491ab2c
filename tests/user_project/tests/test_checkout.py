from langfuse import get_client, propagate_attributes

from myapp.tasks import charge


def test_charge_runs_inside_the_checkout_trace(langfuse_capture_clean, langfuse_worker):
    langfuse = get_client()
    with langfuse.start_as_current_observation(name="POST /checkout") as request:
        with propagate_attributes(user_id="user-1", session_id="cart-9"):
            assert charge.delay(42).get(timeout=10) == {"charged": 42}

    server = langfuse_capture_clean
    server.wait_for(lambda s: s.trace(request.trace_id).find("myapp.tasks.charge"))
    trace = server.trace(request.trace_id)
    assert (trace.user_id, trace.session_id) == ("user-1", "cart-9")
    assert trace.find("myapp.tasks.charge").level == "DEFAULT"
    assert trace.orphans() == []
