"""Writes the seeds of the `thumbnail_inspect` and `thumbnail_render` fuzz targets (Pillow only).

    target/tools-venv/bin/python fuzz/seeds/make_thumbnail_seeds.py

Small (a few hundred bytes to a few KB), deterministic files of every format `thumbnail` reads.
`thumbnail_inspect/` gets the files as they are; `thumbnail_render/` gets them behind the byte that
`fuzz_targets/thumbnail_render.rs` reads as the format selector (`FORMATS` there: its index).
"""

import io
import random
import struct
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
RNG = random.Random(20250101)

# The selector byte of thumbnail_render.rs: data[0] % 6 indexes its FORMATS.
SELECTOR = {"jpeg": 0, "png": 1, "gif": 2, "webp": 3, "bmp": 4, "tiff": 5}


def picture(size, mode="RGB"):
    """Gradient, a shape and some noise: every decoder path sees more than flat colour."""
    w, h = size
    r = Image.linear_gradient("L").resize(size)
    g = Image.linear_gradient("L").rotate(90).resize(size)
    b = Image.frombytes("L", size, RNG.randbytes(w * h))
    img = Image.merge("RGB", (r, g, b))
    ImageDraw.Draw(img).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), outline=(255, 255, 255))
    return img.convert(mode) if mode != "RGB" else img


def rgba(size):
    img = picture(size).convert("RGBA")
    alpha = Image.radial_gradient("L").resize(size)
    img.putalpha(alpha)
    return img


def frames(size, n):
    out = []
    for i in range(n):
        img = Image.new("RGBA", size, (0, 0, 0, 0))
        d = ImageDraw.Draw(img)
        x = i * size[0] // n
        d.rectangle((x, 0, x + size[0] // n, size[1] - 1), fill=(255, 40 * i % 256, 0, 255))
        d.ellipse((0, 0, size[0] // 2, size[1] // 2), fill=(0, 0, 255, 128))
        out.append(img)
    return out


def save(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def exif_orientation(value):
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def grey16():
    """16-bit greyscale (big-endian samples: Pillow writes a TIFF of it as "MM")."""
    w, h = 16, 12
    data = b"".join(struct.pack(">H", (x * 4096 + y * 257) & 0xFFFF) for y in range(h) for x in range(w))
    return Image.frombytes("I;16B", (w, h), data)


def seeds():
    yield "jpeg_baseline.jpg", "jpeg", save(picture((48, 32)), "JPEG", quality=75)
    yield "jpeg_progressive.jpg", "jpeg", save(picture((48, 32)), "JPEG", quality=75, progressive=True)
    # Orientation 6 (rotate 90 CW to display): stored 32x24, displayed 24x32.
    yield "jpeg_exif_rot6.jpg", "jpeg", save(picture((32, 24)), "JPEG", quality=70, exif=exif_orientation(6))
    yield "jpeg_cmyk.jpg", "jpeg", save(picture((24, 16), "CMYK"), "JPEG", quality=70)
    yield "jpeg_grey_420.jpg", "jpeg", save(picture((40, 24), "L"), "JPEG", quality=60)
    yield "png_rgba.png", "png", save(rgba((24, 16)), "PNG")
    yield "png_16bit.png", "png", save(grey16(), "PNG")
    yield "png_palette.png", "png", save(picture((16, 16)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG")
    fr = frames((24, 16), 4)
    yield "apng.png", "png", save(fr[0], "PNG", save_all=True, append_images=fr[1:], duration=[80, 40, 120, 40], loop=0)
    gif_frames = [f.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=8) for f in fr]
    yield "gif_animated.gif", "gif", save(gif_frames[0], "GIF", save_all=True, append_images=gif_frames[1:], duration=60, loop=0, disposal=2)
    yield "gif_still.gif", "gif", save(picture((16, 16)).convert("P"), "GIF")
    yield "webp_animated.webp", "webp", save(fr[0], "WEBP", save_all=True, append_images=fr[1:], duration=70, loop=0, quality=50)
    yield "webp_lossy.webp", "webp", save(picture((24, 16)), "WEBP", quality=50)
    yield "webp_lossless.webp", "webp", save(rgba((16, 12)), "WEBP", lossless=True)
    yield "bmp_rgb.bmp", "bmp", save(picture((16, 12)), "BMP")
    yield "bmp_palette.bmp", "bmp", save(picture((16, 12)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "BMP")
    yield "tiff_rgb.tif", "tiff", save(picture((16, 12)), "TIFF")
    yield "tiff_deflate_rgba.tif", "tiff", save(rgba((16, 12)), "TIFF", compression="tiff_adobe_deflate")
    yield "tiff_lzw.tif", "tiff", save(picture((16, 12)), "TIFF", compression="tiff_lzw")
    yield "tiff_16bit_be.tif", "tiff", save(grey16(), "TIFF")


def main():
    inspect_dir = HERE / "thumbnail_inspect"
    render_dir = HERE / "thumbnail_render"
    inspect_dir.mkdir(exist_ok=True)
    render_dir.mkdir(exist_ok=True)
    for name, fmt, data in seeds():
        assert data and len(data) < 8192, (name, len(data))
        (inspect_dir / name).write_bytes(data)
        (render_dir / name).write_bytes(bytes([SELECTOR[fmt]]) + data)
        print(f"{len(data):6} {name}")


if __name__ == "__main__":
    main()
