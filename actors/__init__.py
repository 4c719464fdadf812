"""The Pykka actors: runtime (pooled actors, timers), supervision, routers, push, batch."""
