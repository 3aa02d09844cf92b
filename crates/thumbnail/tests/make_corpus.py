"""Writes the thumbnail test corpus into the directory given as argv[1] (Pillow only).

Every input is deterministic: noise comes from a seeded `random.Random`, not from
`Image.effect_noise` (whose C `rand()` is not seedable), so the same bytes come out every run.
"""

import base64
import io
import random
import struct
import sys
import zlib
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(sys.argv[1])
RNG = random.Random(20240611)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def noise(size, amount):
    return Image.frombytes("L", size, RNG.randbytes(size[0] * size[1])).point(
        lambda v: 128 + (v - 128) * amount // 255
    )


def photo(size):
    """Gradients plus noise: compresses like a photo, not like a flat test card."""
    w, h = size
    r = Image.linear_gradient("L").resize(size)
    g = Image.linear_gradient("L").rotate(90).resize(size)
    b = Image.radial_gradient("L").resize(size)
    base = Image.merge("RGB", (r, g, b))
    grain = Image.merge("RGB", [noise(size, 96)] * 3)
    img = Image.blend(base, grain, 0.2)
    ImageDraw.Draw(img).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), outline=WHITE, width=6)
    return img


def quadrants(size):
    """Displayed image for the orientation files: red, green / blue, white."""
    w, h = size
    img = Image.new("RGB", size, WHITE)
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, w // 2 - 1, h // 2 - 1), fill=RED)
    d.rectangle((w // 2, 0, w - 1, h // 2 - 1), fill=GREEN)
    d.rectangle((0, h // 2, w // 2 - 1, h - 1), fill=BLUE)
    return img


# The stored image is the displayed one under the inverse of the orientation's transform
# (ImageOps.exif_transpose applies: 6 -> ROTATE_270, 8 -> ROTATE_90, the rest self-inverse).
INVERSE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def png_chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def frames(size, count, mode="RGB"):
    """A moving square on a changing background: every frame differs from the one before."""
    out = []
    w, h = size
    for i in range(count):
        bg = (40 * i % 256, 100, 200 - 30 * i % 200) + ((255,) if mode == "RGBA" else ())
        img = Image.new(mode, size, bg)
        x = (i * w // count) % (w - w // 4)
        ImageDraw.Draw(img).rectangle((x, h // 3, x + w // 4, 2 * h // 3), fill=WHITE)
        out.append(img)
    return out


def main():
    OUT.mkdir(parents=True, exist_ok=True)

    big = photo((1200, 900))
    big.save(OUT / "baseline.jpg", quality=80)
    big.save(OUT / "progressive.jpg", quality=80, progressive=True)
    baseline = (OUT / "baseline.jpg").read_bytes()
    (OUT / "truncated.jpg").write_bytes(baseline[: len(baseline) // 2])

    shown = quadrants((400, 300))
    for o, transform in INVERSE.items():
        stored = shown if transform is None else shown.transpose(transform)
        exif = Image.Exif()
        exif[0x0112] = o
        stored.save(OUT / f"orient_{o}.jpg", quality=90, exif=exif)
        if o == 6:
            # The other formats that carry an orientation: PNG's eXIf, WebP's EXIF, TIFF's tag.
            stored.save(OUT / "orient_6.png", exif=exif)
            stored.save(OUT / "orient_6.webp", lossless=True, exif=exif)
            stored.save(OUT / "orient_6.tiff", compression="tiff_lzw", tiffinfo={0x0112: 6})

    cmyk = Image.new("CMYK", (300, 200), (0, 255, 255, 0))
    ImageDraw.Draw(cmyk).rectangle((0, 0, 20, 20), fill=(0, 230, 230, 10))
    cmyk.save(OUT / "cmyk.jpg", quality=90)

    Image.linear_gradient("L").rotate(90).resize((500, 400)).save(OUT / "gray.jpg", quality=85)

    rgba = Image.new("RGBA", (400, 300), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).rectangle((200, 0, 399, 299), fill=(30, 60, 220, 255))
    rgba.save(OUT / "rgba.png")

    # 16-bit grayscale, dark on the left to bright on the right.
    w, h = 500, 400
    row = b"".join(struct.pack("<H", x * 65535 // (w - 1)) for x in range(w))
    Image.frombytes("I;16", (w, h), row * h).save(OUT / "gray16.png")

    apng = frames((400, 300), 6, "RGBA")
    apng[0].save(OUT / "anim.apng", "PNG", save_all=True, append_images=apng[1:], duration=80, loop=0)

    gif = frames((400, 300), 8)
    gif[0].save(
        OUT / "anim.gif",
        save_all=True,
        append_images=gif[1:],
        duration=[60, 70, 80, 90, 60, 70, 80, 90],
        disposal=[0, 1, 2, 3, 1, 2, 3, 0],
        loop=0,
    )

    photo((300, 200)).convert("P").save(OUT / "still.gif")

    # More frames than an animated thumbnail keeps: the first red, then alternating (so that
    # Pillow merges none), 20 ms each.
    many = []
    for i in range(300):
        f = Image.new("P", (40, 40), 0 if i == 0 else 1 + i % 2)
        f.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
        many.append(f)
    many[0].save(OUT / "long.gif", save_all=True, append_images=many[1:], duration=20, loop=0)

    webp = frames((400, 300), 6)
    webp[0].save(OUT / "anim.webp", save_all=True, append_images=webp[1:], duration=80, loop=0, quality=60)
    photo((640, 480)).save(OUT / "still.webp", quality=60)

    small = photo((400, 300))
    small.save(OUT / "image.bmp")
    small.save(OUT / "image.tiff", compression="tiff_lzw")

    Image.new("RGB", (1, 1), RED).save(OUT / "one.png")

    (OUT / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + RNG.randbytes(2000))

    # Blue left half drawn; the right half would show a red PNG if the renderer read files or
    # decoded embedded images. It must stay transparent.
    red = OUT / "red.png"
    Image.new("RGB", (100, 200), (255, 0, 0)).save(red)
    red_data = base64.b64encode(red.read_bytes()).decode()
    (OUT / "local.svg").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="200" height="200">'
        '<rect x="0" y="0" width="100" height="200" fill="#0000ff"/>'
        f'<image href="file://{red}" x="100" y="0" width="100" height="100"/>'
        f'<image href="red.png" x="100" y="100" width="100" height="50"/>'
        f'<image href="data:image/png;base64,{red_data}" x="100" y="150" width="100" height="50"/>'
        '</svg>\n'
    )
    # Billion laughs: entities expanding to 10^9 nodes.
    lol = ['<?xml version="1.0"?>', '<!DOCTYPE svg [', '<!ENTITY l0 "<g/>">']
    lol += [f'<!ENTITY l{i} "' + f"&l{i-1};" * 10 + '">' for i in range(1, 10)]
    lol += [']>', '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">&l9;</svg>']
    (OUT / "lol.svg").write_text("\n".join(lol))

    # The header claims 30000x30000 RGB; the data is a few rows' worth of zeros.
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 + 30000 * 3) * 4)
    (OUT / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )

    # 40 frames of one pixel each on a 2000x2000 screen: tiny rectangles, but decoders
    # composite every frame onto the whole canvas (40 x 4 MP). Written by hand: Pillow would
    # widen the rectangles.
    gif = bytearray(b"GIF89a" + struct.pack("<HH", 2000, 2000) + b"\x80\x00\x00")
    gif += bytes([255, 0, 0, 0, 0, 255])  # global colour table: red, blue
    gif += b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    for i in range(40):
        gif += b"\x21\xf9\x04\x04\x05\x00\x00\x00"  # 50 ms, keep
        gif += b"\x2c" + struct.pack("<HHHH", i, i, 1, 1) + b"\x00"
        # LZW, minimum code size 2: clear, the pixel, end (3 bits each).
        gif += b"\x02\x02" + (b"\x44" if i % 2 == 0 else b"\x4c") + b"\x01\x00"
    gif += b"\x3b"
    (OUT / "sparse.gif").write_bytes(bytes(gif))

    # Alternating colours so Pillow cannot merge identical frames.
    tiny = [Image.new("P", (4, 4), i % 2) for i in range(5000)]
    for t in tiny:
        t.putpalette([255, 0, 0, 0, 0, 255])
    buf = io.BytesIO()
    tiny[0].save(buf, "GIF", save_all=True, append_images=tiny[1:], duration=20, loop=0, optimize=False)
    (OUT / "frames5000.gif").write_bytes(buf.getvalue())


if __name__ == "__main__":
    main()
