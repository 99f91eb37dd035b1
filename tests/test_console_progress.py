"""Progress lines in a log (core/progress.py ConsoleProgress without a terminal)."""
import io

from fairseq_ext.core.progress import ConsoleProgress


def lines_of(stream):
    return stream.getvalue().splitlines()


def test_the_end_is_printed_once_when_the_last_interval_line_already_showed_it():
    stream = io.StringIO()
    progress = ConsoleProgress("CoLA run", 10, interval_s=0, stream=stream, bar=False)
    for done in (4, 10):
        progress.update(done, rate=2.0, detail="epoch 1/1")
    progress.close()
    assert lines_of(stream) == ["  CoLA run: 4/10 updates (40%), 2.00 updates/s, ETA 3s, epoch 1/1",
                                "  CoLA run: 10/10 updates (100%), 2.00 updates/s, ETA 0s, epoch 1/1"]


def test_between_intervals_the_first_line_comes_with_the_speed_and_close_adds_where_it_ended():
    stream = io.StringIO()
    progress = ConsoleProgress("STS-B run", 10, interval_s=3600, stream=stream, bar=False)
    progress.update(2, rate=1.0)
    progress.update(7, rate=1.0)  # within the interval: no line
    progress.write("    epoch 1 valid: loss 0.5")
    progress.close()
    assert lines_of(stream) == ["  STS-B run: 2/10 updates (20%), 1.00 updates/s, ETA 8s",
                                "    epoch 1 valid: loss 0.5",
                                "  STS-B run: 7/10 updates (70%), 1.00 updates/s, ETA 3s"]


def test_a_stop_closes_without_a_final_line():
    stream = io.StringIO()
    progress = ConsoleProgress("run", 10, interval_s=3600, stream=stream, bar=False)
    progress.update(2, rate=1.0)
    progress.update(5, rate=1.0)
    progress.close(final_line=False)
    assert lines_of(stream) == ["  run: 2/10 updates (20%), 1.00 updates/s, ETA 8s"]


def test_the_end_is_printed_once_even_when_the_detail_changed_after_it():
    """The GLUE runner refreshes the job ETA after a run's last update: the end stays one line."""
    stream = io.StringIO()
    progress = ConsoleProgress("CoLA run", 7, interval_s=0, stream=stream, bar=False)
    progress.update(7, rate=2.0, detail="job ETA 3s")  # an interval line at the last update
    progress.interval_s = 3600
    progress.update(7, rate=2.0, detail="job ETA 1s")  # the runner's next poll, before the next interval
    progress.close()
    assert [line for line in lines_of(stream) if "7/7" in line] == [
        "  CoLA run: 7/7 updates (100%), 2.00 updates/s, ETA 0s, job ETA 3s"]


def test_a_terminal_bar_has_no_space_before_its_details():
    stream = io.StringIO()
    progress = ConsoleProgress("run", 1150, stream=stream, bar=True)
    progress.update(44, rate=2.42)
    progress.close()
    assert "44/1150, 2.42 updates/s" in stream.getvalue() and "44/1150 ," not in stream.getvalue()
