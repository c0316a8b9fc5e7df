//! Integration tests, compiled into one binary to keep link time down. Each module drives the
//! real thing: the `roomscore` binary, real UDP sockets, cpal's real ALSA path.

mod it;
