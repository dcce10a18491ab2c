from myapp.celery import app


@app.task
def charge(amount):
    return {"charged": amount}
