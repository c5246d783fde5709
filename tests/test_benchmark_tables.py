"""benchmarks/_measure.py keeps one README table per processor family: a run on an AMD EPYC must not erase the
Intel Xeon's table of the same section, since the speed ratios the issue targets differ between them."""
from tests.scripts import load_script


def test_each_processor_family_keeps_its_own_table(tmp_path, monkeypatch):
    measure = load_script('benchmarks/_measure.py')
    readme = tmp_path / 'README.md'
    readme.write_text('# Benchmarks\n\n## Models\n\n<!-- throughput:intel-xeon:start -->\nxeon 1\n'
                      '<!-- throughput:intel-xeon:end -->\n\n## Later section\n')
    monkeypatch.setattr(measure, 'README', readme)

    monkeypatch.setattr(measure, 'processor_key', lambda: 'amd-epyc')
    measure.update_readme('amd 1', 'throughput')
    text = readme.read_text()
    assert text.index('xeon 1') < text.index('amd 1') < text.index('## Later section')

    measure.update_readme('amd 2', 'throughput')
    monkeypatch.setattr(measure, 'processor_key', lambda: 'intel-xeon')
    measure.update_readme('xeon 2', 'throughput')
    measure.update_readme('only xeon', 'operators')
    text = readme.read_text()
    assert 'amd 1' not in text and 'xeon 1' not in text
    assert text.index('xeon 2') < text.index('amd 2') < text.index('## Later section') < text.index('only xeon')
    assert text.count('<!-- throughput:amd-epyc:start -->') == 1 and text.count('<!-- throughput:amd-epyc:end -->') == 1


def test_processor_family_names_a_cpu_without_avx512_apart(monkeypatch):
    """One model name covers machines with and without AVX512 (both AMD EPYC here): their tables must not
    overwrite each other."""
    from aft_vit import machine
    monkeypatch.setattr(machine.torch.cuda, 'is_available', lambda: False)
    for flags, key in (('fpu avx2 avx512f avx512_bf16', 'amd-epyc'), ('fpu avx2', 'amd-epyc-no-avx512')):
        monkeypatch.setattr(machine, '_cpuinfo', lambda flags=flags: {'model name': 'AMD EPYC', 'flags': flags})
        assert machine.processor_key() == key
    monkeypatch.setattr(machine, '_cpuinfo', lambda: {'model name': 'Intel(R) Xeon(R) Processor', 'flags': 'avx512f'})
    assert machine.processor_key() == 'intel-xeon'


def test_blocks_table_times_each_part_of_both_blocks(monkeypatch):
    """benchmarks/blocks.py's rows: every part of both blocks timed (a positive median), 'mixing' the mixer less its
    two projections, and the ratio DeiT / AFT of the printed times."""
    import sys
    monkeypatch.setattr(sys, 'path', list(sys.path))  # the script puts benchmarks/ first
    blocks = load_script('benchmarks/blocks.py')
    rows = blocks._rows('aft_conv_tiny', 'deit_tiny_patch16_224', batch=1, rounds=3)
    assert [r['part'] for r in rows] == ['qkv', 'proj', 'mixer', 'mixing', 'mlp', 'block']
    times = {r['part']: (float(r['AFT us']), float(r['DeiT us'])) for r in rows}
    for part in ('qkv', 'proj', 'mixer', 'mlp', 'block'):
        assert min(times[part]) > 0
    for i in range(2):
        mixing = times['mixer'][i] - times['qkv'][i] - times['proj'][i]
        assert abs(times['mixing'][i] - mixing) <= 1.5  # each printed time rounded to 1 us
    for r in rows:
        if r['DeiT / AFT'] and float(r['AFT us']) >= 100:  # (none where AFT's 'mixing' came out <= 0; rounding aside)
            assert abs(float(r['DeiT / AFT']) - float(r['DeiT us']) / float(r['AFT us'])) < 0.02
