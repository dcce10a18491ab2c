"""Views that publish tasks in every way a Django project does."""

from __future__ import annotations

from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse

from .models import Order
from .tasks import record


def home(request: HttpRequest) -> HttpResponse:
    return HttpResponse("home")


def health(request: HttpRequest) -> HttpResponse:
    record.delay("health", "health")  # would be a trace if health checks were traced
    return HttpResponse("ok")


def order_detail(request: HttpRequest, pk: int) -> HttpResponse:
    if pk == 404:
        return HttpResponse("no such order", status=404)
    result = record.delay(str(pk), "detail")
    return JsonResponse({"order": pk, "task_id": result.id})


def buy(request: HttpRequest, pk: int) -> HttpResponse:
    """Publishes on commit; ``?mode=`` picks how, ``?ref=`` names the order."""
    mode = request.GET.get("mode", "delay_on_commit")
    reference = request.GET["ref"]
    if mode == "delay_on_commit":
        with transaction.atomic():
            Order.objects.create(reference=reference, quantity=pk)
            record.delay_on_commit(reference, mode)
    elif mode == "nested":
        with transaction.atomic():
            Order.objects.create(reference=reference, quantity=pk)
            with transaction.atomic():
                record.delay_on_commit(reference, "nested-inner")
            record.apply_async_on_commit((reference, "nested-outer"))
    elif mode == "on_commit":
        with transaction.atomic():
            Order.objects.create(reference=reference, quantity=pk)
            transaction.on_commit(lambda: record.apply_async((reference, mode)))
    elif mode == "signal":
        with transaction.atomic():
            Order.objects.create(reference=reference, quantity=pk, notify=True)
    elif mode == "rollback":
        try:
            with transaction.atomic():
                Order.objects.create(reference=reference, quantity=pk)
                record.delay_on_commit(reference, mode)
                raise ValueError("out of stock")
        except ValueError:
            return HttpResponse("rolled back", status=409)
    elif mode == "savepoint-rollback":
        with transaction.atomic():
            Order.objects.create(reference=reference, quantity=pk)
            record.delay_on_commit(reference, "kept")
            try:
                with transaction.atomic():
                    record.delay_on_commit(reference, "dropped")
                    raise ValueError("inner failure")
            except ValueError:
                pass
    elif mode == "outer":  # the transaction belongs to OuterAtomicMiddleware
        Order.objects.create(reference=reference, quantity=pk)
        record.delay_on_commit(reference, mode)
    return HttpResponse("bought")


async def async_order(request: HttpRequest, pk: int) -> HttpResponse:
    result = record.delay(str(pk), "async")
    return JsonResponse({"order": pk, "task_id": result.id})


def article(request: HttpRequest, year: str) -> HttpResponse:
    return HttpResponse(year)


def legacy(request: HttpRequest, code: str) -> HttpResponse:  # unnamed groups not passed
    return HttpResponse(code)


def item(request: HttpRequest, slug: str) -> HttpResponse:
    return HttpResponse(slug)


def boom(request: HttpRequest) -> HttpResponse:
    raise ZeroDivisionError("the view divided by zero")


def forbidden(request: HttpRequest) -> HttpResponse:
    raise PermissionDenied("staff only")
