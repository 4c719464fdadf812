"""Actor runtime: Pykka actors on a shared thread pool, and a shared timer service.

`PooledActor` is a `pykka.Actor` whose receive loop runs in slices on an
`ActorPool` rather than on a thread of its own, so a process can hold a
hundred thousand actors on a handful of threads. `TimerWheel` fires
deadlines for all of them from one thread.
"""

from actors.runtime._pool import ActorPool, PooledActor
from actors.runtime._timers import TimerHandle, TimerWheel

__all__ = ["ActorPool", "PooledActor", "TimerHandle", "TimerWheel"]
