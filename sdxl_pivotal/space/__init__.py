"""The Space (`app.py`): a browser app over the trainer. One module per concern: `uploads` (images into a fresh run
folder), `presets` (what are you training?), `command` (settings -> the `accelerate launch` command, from the
trainer's own parser), `estimate` (time, cost, memory), `runs` (one training subprocess at a time, a queue),
`progress` (what a run's files say: steps, loss, validation images), `results` (zip, try it, push to the Hub).
The app never trains itself: it runs the real script."""
