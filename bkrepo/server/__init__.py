"""``bkr serve``: every repository under a root, over HTTP (an ASGI app on hypercorn's trio
worker).  ``app`` routes and handles requests; ``asgi`` holds the small request/response
helpers; ``auth`` decides who may read and write; ``run`` starts the server."""
