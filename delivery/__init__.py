"""Talking to providers: APNs, FCM, the push bouncer and SMTP. Knows nothing of actors."""
